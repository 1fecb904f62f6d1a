//! Fetching image URLs without opening the network behind the server to whoever can send a request.
//!
//! - Only `http` and `https`. The URL parser normalizes odd IPv4 spellings (`2130706433`, `0177.0.0.1`) to the
//!   address they mean before anything is checked.
//! - Addresses are checked before any connection: IP literals directly; host names through the client's resolver,
//!   which looks the name up once, refuses the name if any address is not allowed, and hands the checked addresses
//!   to the connector, so the connection goes to an address that was checked (no second lookup to rebind).
//! - Loopback, private, link-local (cloud metadata), CGNAT, multicast, unspecified, reserved, documentation,
//!   IPv4-mapped/-compatible IPv6, site-local and unique-local addresses are refused, unless
//!   `--allow-private-urls` or an `--allow-url-cidr` range says otherwise.
//! - Every refusal gives the same text, so the server cannot be used to map a network.
//! - At most 3 redirects, each hop checked again; connect and total timeouts; a byte cap; the body must start with
//!   the magic bytes of a supported image format; no proxy from the environment.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;

use crate::batching::{Admission, BudgetPermit, MemoryBudget};
use crate::error::{Error, Reason};

/// The one message for every refused destination.
pub const REFUSED: &str = "image URL refused: its address is not allowed";
/// Most redirects followed.
pub const MAX_REDIRECTS: usize = 3;

/// Which destination addresses may be fetched.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    /// Allow every address (tests, closed networks).
    pub allow_private: bool,
    /// Ranges allowed even though they are private.
    pub allow: Vec<IpNet>,
}

impl AddressPolicy {
    /// True when a connection to `ip` is allowed.
    pub fn permits(&self, ip: IpAddr) -> bool {
        self.allow_private || self.allow.iter().any(|n| n.contains(&ip)) || is_public(ip)
    }
}

/// True for addresses that are globally reachable unicast: everything but the special-purpose ranges.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_unspecified()            // 0.0.0.0
        || o[0] == 0                 // 0.0.0.0/8 "this network"
        || ip.is_loopback()          // 127.0.0.0/8
        || ip.is_private()           // 10/8, 172.16/12, 192.168/16
        || ip.is_link_local()        // 169.254/16, cloud metadata 169.254.169.254
        || (o[0] == 100 && (o[1] & 0xC0) == 64) // 100.64/10 CGNAT (Alibaba metadata 100.100.100.200)
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0/24 IETF protocol assignments
        || (o[0] == 192 && o[1] == 0 && o[2] == 2) // TEST-NET-1
        || (o[0] == 198 && (o[1] & 0xFE) == 18)   // 198.18/15 benchmarking
        || (o[0] == 198 && o[1] == 51 && o[2] == 100) // TEST-NET-2
        || (o[0] == 203 && o[1] == 0 && o[2] == 113)  // TEST-NET-3
        || ip.is_multicast()         // 224/4
        || o[0] >= 240               // 240/4 reserved, broadcast
        || ip.is_broadcast())
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
        return false;
    }
    // IPv4-mapped (::ffff:0:0/96) and IPv4-compatible (::/96): refused outright.
    if s[0..5] == [0, 0, 0, 0, 0] && (s[5] == 0xffff || s[5] == 0) {
        return false;
    }
    // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) reach an embedded IPv4 address: judge that one.
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        return is_public_v4(Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8));
    }
    if s[0] == 0x2002 {
        return is_public_v4(Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8));
    }
    !((s[0] & 0xffc0) == 0xfe80   // fe80::/10 link-local
        || (s[0] & 0xffc0) == 0xfec0 // fec0::/10 site-local
        || (s[0] & 0xfe00) == 0xfc00 // fc00::/7 unique local (AWS metadata fd00:ec2::254)
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0] == 0x2001 && s[1] == 0)      // Teredo
        || (s[0] == 0x0100 && s[1..4] == [0, 0, 0])) // discard-only 100::/64
}

/// True for a value that names an `http://` or `https://` URL (scheme matched case-insensitively), as opposed to
/// base64 or a file path.
pub fn is_http_url(s: &str) -> bool {
    let head = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    head.starts_with("http://") || head.starts_with("https://")
}

/// The address a URL's host names literally, if it is an IP literal.
fn literal_ip(url: &Url) -> Option<IpAddr> {
    match url.host()? {
        url::Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
        url::Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
        url::Host::Domain(_) => None,
    }
}

/// Checks what can be checked of a URL before any network activity: scheme, host, and IP literals.
pub fn check_url(url: &Url, policy: &AddressPolicy) -> Result<(), Error> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Error::new(
            Reason::UrlNotAllowed,
            format!("image URL scheme {:?} is not supported (http, https)", url.scheme()),
        ));
    }
    if url.host().is_none() {
        return Err(Error::new(Reason::UrlNotAllowed, "image URL has no host"));
    }
    match literal_ip(url) {
        Some(ip) if !policy.permits(ip) => Err(Error::new(Reason::UrlNotAllowed, REFUSED)),
        _ => Ok(()),
    }
}

/// Marks a refusal inside the HTTP client's error chain.
#[derive(Debug)]
struct Refused;

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REFUSED)
    }
}

impl std::error::Error for Refused {}

/// Looks a host name up once and refuses it if any of its addresses is not allowed.
struct CheckedResolver {
    policy: Arc<AddressPolicy>,
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if addrs.is_empty() {
                return Err(format!("{host}: no addresses").into());
            }
            if addrs.iter().any(|a| !policy.permits(a.ip())) {
                return Err(Box::new(Refused) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// Fetch settings.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    pub policy: AddressPolicy,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub max_bytes: usize,
}

/// The image URL fetcher shared by all requests (one connection pool).
pub struct UrlFetcher {
    client: reqwest::Client,
    policy: Arc<AddressPolicy>,
    timeout: Duration,
    max_bytes: usize,
}

impl UrlFetcher {
    /// A fetcher with its own HTTP client (no proxy, checked resolver, checked redirects).
    pub fn new(config: FetchConfig) -> anyhow::Result<Self> {
        let policy = Arc::new(config.policy);
        let redirect_policy = policy.clone();
        let client = reqwest::Client::builder()
            .no_proxy()
            .dns_resolver(Arc::new(CheckedResolver { policy: policy.clone() }))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() > MAX_REDIRECTS {
                    return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
                }
                match check_url(attempt.url(), &redirect_policy) {
                    Ok(()) => attempt.follow(),
                    Err(_) if literal_ip(attempt.url()).is_some() => attempt.error(Refused),
                    Err(e) => attempt.error(e.message().to_string()),
                }
            }))
            .connect_timeout(config.connect_timeout)
            .timeout(config.timeout)
            .user_agent(concat!("clipserve/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(UrlFetcher { client, policy, timeout: config.timeout, max_bytes: config.max_bytes })
    }

    /// Downloads an image: checked destination, capped size, image magic bytes. The body's bytes are held
    /// against `budget` as they arrive (waiting for room until `deadline`); the permit comes back with them.
    pub async fn fetch(
        &self,
        url: &str,
        budget: &MemoryBudget,
        deadline: Option<Instant>,
    ) -> Result<(Vec<u8>, BudgetPermit), Error> {
        let url = Url::parse(url).map_err(|e| Error::new(Reason::UrlNotAllowed, format!("invalid image URL: {e}")))?;
        check_url(&url, &self.policy)?;
        let mut held = BudgetPermit::none();
        match tokio::time::timeout(self.timeout, self.download(url, budget, deadline, &mut held)).await {
            Ok(result) => result.map(|body| (body, held)),
            Err(_) => Err(Error::new(Reason::UrlFetchFailed, format!("image URL timed out after {:?}", self.timeout))),
        }
    }

    async fn download(
        &self,
        url: Url,
        budget: &MemoryBudget,
        deadline: Option<Instant>,
        held: &mut BudgetPermit,
    ) -> Result<Vec<u8>, Error> {
        let mut response = self.client.get(url).send().await.map_err(fetch_error)?;
        let status = response.status();
        if !status.is_success() {
            return Err(Error::new(Reason::UrlFetchFailed, format!("image URL answered HTTP {}", status.as_u16())));
        }
        if response.content_length().is_some_and(|n| n > self.max_bytes as u64) {
            return Err(Error::new(
                Reason::ImageTooLarge,
                format!("image URL body exceeds the limit of {} bytes", self.max_bytes),
            ));
        }
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_string();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(fetch_error)? {
            if body.len() + chunk.len() > self.max_bytes {
                return Err(Error::new(
                    Reason::ImageTooLarge,
                    format!("image URL body exceeds the limit of {} bytes", self.max_bytes),
                ));
            }
            held.merge(budget.acquire(chunk.len(), Admission::Wait, deadline).await?);
            body.extend_from_slice(&chunk);
        }
        match image::guess_format(&body) {
            Ok(f) if crate::inputs::image::is_supported(f) => Ok(body),
            _ => Err(Error::new(
                Reason::UrlFetchFailed,
                format!("image URL did not return an image (content-type {content_type})"),
            )),
        }
    }
}

/// Maps a client error to the item's error, with the one refusal text wherever a check refused.
fn fetch_error(e: reqwest::Error) -> Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = source {
        if s.downcast_ref::<Refused>().is_some() || s.to_string() == REFUSED {
            return Error::new(Reason::UrlNotAllowed, REFUSED);
        }
        source = s.source();
    }
    let what = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "connection failed".to_string()
    } else if e.is_redirect() {
        format!("redirect refused ({})", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default())
    } else {
        "request failed".to_string()
    };
    Error::new(Reason::UrlFetchFailed, format!("image URL could not be fetched: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn special_purpose_addresses_are_not_public() {
        for s in [
            "127.0.0.1",
            "127.255.0.9",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.100.100.200",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "192.0.0.170",
            "198.18.0.1",
            "::",
            "::1",
            "fe80::1",
            "fec0::1",
            "fc00::1",
            "fd00:ec2::254",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:8.8.8.8",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "2002:a00:1::",
            "2001:db8::1",
        ] {
            assert!(!is_public(ip(s)), "{s} must be refused");
        }
        for s in ["8.8.8.8", "1.1.1.1", "93.184.216.34", "100.128.0.1", "2606:4700::1111", "64:ff9b::808:808"] {
            assert!(is_public(ip(s)), "{s} is public");
        }
    }

    #[test]
    fn url_literals_are_checked_before_any_connection() {
        let policy = AddressPolicy::default();
        let refused = |u: &str| matches!(check_url(&Url::parse(u).unwrap(), &policy), Err(e) if e.kind() == Kind::InvalidArgument && e.message() == REFUSED);
        for u in [
            "http://127.0.0.1/x.jpg",
            "http://10.0.0.1/x.jpg",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]:8080/x",
            "http://2130706433/x",
            "http://0177.0.0.1/x",
            "http://0x7f.1/x",
            "http://[::ffff:169.254.169.254]/x",
            "https://192.168.0.1/x",
        ] {
            assert!(refused(u), "{u} must be refused");
        }
        assert!(check_url(&Url::parse("https://example.com/cat.jpg").unwrap(), &policy).is_ok());
        assert!(check_url(&Url::parse("http://8.8.8.8/cat.jpg").unwrap(), &policy).is_ok());
        assert!(matches!(
            check_url(&Url::parse("file:///etc/passwd").unwrap(), &policy),
            Err(e) if e.kind() == Kind::InvalidArgument && e.message().contains("scheme")
        ));
        assert!(check_url(&Url::parse("ftp://example.com/x").unwrap(), &policy).is_err());
    }

    #[test]
    fn allow_flags() {
        let open = AddressPolicy { allow_private: true, allow: vec![] };
        assert!(open.permits(ip("127.0.0.1")));
        let one = AddressPolicy { allow_private: false, allow: vec!["127.0.0.2/32".parse().unwrap()] };
        assert!(one.permits(ip("127.0.0.2")));
        assert!(!one.permits(ip("127.0.0.1")));
    }
}
