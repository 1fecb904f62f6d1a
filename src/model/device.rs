//! Device selection: `cpu`, `cuda`, `cuda:N`, lists of them, or `auto`.

use anyhow::{bail, Context};
use tch::Device;

/// Loads libtorch's CUDA kernels. A tch binary links only `libtorch_cpu`; the CUDA kernels register when
/// `libtorch_cuda.so` is loaded, which must happen before the first CUDA call.
fn load_cuda_library() -> bool {
    use std::sync::OnceLock;
    static LOADED: OnceLock<bool> = OnceLock::new();
    *LOADED.get_or_init(|| {
        // SAFETY: dlopen with a constant, NUL-terminated name; the handle is kept for the process lifetime.
        let handle = unsafe { libc::dlopen(c"libtorch_cuda.so".as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        !handle.is_null()
    })
}

/// Number of CUDA devices usable by libtorch (0 where there is no GPU or no CUDA build of libtorch).
pub fn cuda_device_count() -> usize {
    if !load_cuda_library() {
        return 0;
    }
    if tch::Cuda::is_available() {
        tch::Cuda::device_count().max(0) as usize
    } else {
        0
    }
}

/// Parses `--device`.
pub fn parse_devices(spec: &str) -> anyhow::Result<Vec<Device>> {
    let spec = spec.trim();
    if spec == "auto" {
        let n = cuda_device_count();
        return Ok(if n == 0 { vec![Device::Cpu] } else { (0..n).map(Device::Cuda).collect() });
    }
    let mut devices = Vec::new();
    for part in spec.split(',').map(str::trim) {
        let device = match part {
            "cpu" => Device::Cpu,
            "cuda" => Device::Cuda(0),
            _ => match part.strip_prefix("cuda:") {
                Some(n) => Device::Cuda(n.parse().with_context(|| format!("bad device {part:?}"))?),
                None => bail!("bad device {part:?}: use cpu, cuda, cuda:N, a comma-separated list, or auto"),
            },
        };
        if let Device::Cuda(i) = device {
            let n = cuda_device_count();
            if i >= n {
                bail!("device {part:?} asked for, but libtorch sees {n} CUDA device(s)");
            }
        }
        if !devices.contains(&device) {
            devices.push(device);
        }
    }
    if devices.is_empty() {
        bail!("no device given");
    }
    Ok(devices)
}

/// `cpu` or `cuda:N`.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_nonsense() {
        assert_eq!(parse_devices("cpu").unwrap(), vec![Device::Cpu]);
        assert_eq!(parse_devices("cpu,cpu").unwrap(), vec![Device::Cpu]);
        assert!(parse_devices("tpu").is_err());
        assert!(parse_devices("cuda:x").is_err());
        // No GPU here: asking for one must fail clearly, not fall back silently.
        if cuda_device_count() == 0 {
            assert!(parse_devices("cuda:0").is_err());
            assert_eq!(parse_devices("auto").unwrap(), vec![Device::Cpu]);
        }
    }
}
