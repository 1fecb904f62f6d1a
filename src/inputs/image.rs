//! Image decoding and CLIP preprocessing, matching `transformers`' `CLIPImageProcessor` (PIL backend):
//! convert to RGB as transformers does (gray replicated, palettes expanded, transparency composited onto white),
//! resize the shortest side to `size` with Pillow's bicubic, center-crop `size` x `size`, rescale by 1/255,
//! normalize with the mean and std.
//!
//! JPEGs are decoded by libjpeg-turbo's decoder (mozjpeg-sys, built from source; see `jpeg.rs`), the decoder Pillow uses,
//! so the pixels equal Pillow's; other formats by the `image` crate. The pipeline streams the decoded rows into the
//! resize (`resample.rs`) and writes the normalised tensor from its last pass, with per-thread buffers; the fast
//! mode ([`PreprocessMode::Fast`]) decodes large JPEGs DCT-scaled.

use std::cell::RefCell;
use std::io::Cursor;
use std::time::{Duration, Instant};

use base64::Engine as _;
use image::{DynamicImage, ImageFormat, ImageReader};

use crate::error::{Error, Reason};
use crate::inputs::jpeg::{self, DecodeOptions, JpegLimits, Region, RowSink};
use crate::inputs::resample::{resize_rgb_window, ResizeBuffers, Window, WindowResize};

/// A decoded image: packed 8-bit RGB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// Formats decoded; everything else is refused before decoding.
const SUPPORTED: [ImageFormat; 5] =
    [ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::WebP, ImageFormat::Gif, ImageFormat::Bmp];

/// True for the formats clipserve decodes (JPEG, PNG, WebP, GIF, BMP).
pub fn is_supported(format: ImageFormat) -> bool {
    SUPPORTED.contains(&format)
}

/// Preprocessing parameters and limits, from the model manifest and the server flags.
#[derive(Debug, Clone)]
pub struct ImagePreprocessor {
    pub size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Most bytes of an encoded image.
    pub max_bytes: usize,
    /// Most pixels an image may claim in its header.
    pub max_pixels: u64,
    /// Most scans of a (progressive) JPEG.
    pub max_jpeg_scans: u32,
}

/// How images become model inputs (`--preprocess`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PreprocessMode {
    /// Pixels identical to transformers' CLIPImageProcessor (Pillow path): full-resolution decode, Pillow's
    /// bicubic resize.
    #[default]
    Exact,
    /// JPEGs large enough decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (the smallest whose short side still
    /// covers the model's input) without fancy upsampling, then the same resize; smaller JPEGs and other formats
    /// exactly as in the exact mode.
    Fast,
}

impl PreprocessMode {
    pub fn name(self) -> &'static str {
        match self {
            PreprocessMode::Exact => "exact",
            PreprocessMode::Fast => "fast",
        }
    }
}

/// Time spent in each stage of one image's preprocessing ([`ImagePreprocessor::preprocess_timed`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTimes {
    /// Decoding (libjpeg or the `image` crate), checks included.
    pub decode: Duration,
    /// Both resampling passes.
    pub resize: Duration,
    /// Rescaling and normalising into the float tensor (fused into the last pass, timed apart).
    pub normalize: Duration,
}

impl std::ops::AddAssign for StageTimes {
    fn add_assign(&mut self, o: StageTimes) {
        self.decode += o.decode;
        self.resize += o.resize;
        self.normalize += o.normalize;
    }
}

/// Buffers one preprocessing thread reuses from image to image.
#[derive(Default)]
struct Scratch {
    /// Decoded JPEG rows.
    rows: Vec<u8>,
    resize: ResizeBuffers,
}

/// Bytes of scratch a thread keeps between images; what an unusually large image needed beyond it is freed.
const KEPT_SCRATCH_BYTES: usize = 16 << 20;

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Never stops.
pub fn never_stop() -> bool {
    false
}

/// Longest side of a BMP the decoder accepts.
const MAX_BMP_SIDE: u32 = 65_535;

/// Longest side Pillow can resize to (its image dimensions are C `int`s).
pub const MAX_RESIZED_SIDE: u64 = i32::MAX as u64;

/// Decodes base64 as clients send it: standard alphabet, with or without padding, with line breaks and other
/// whitespace anywhere (Python's `base64.encodebytes`), optionally behind a `data:image/...;base64,` prefix.
pub fn decode_base64(text: &str) -> Result<Vec<u8>, Error> {
    let mut body = text.trim();
    if let Some(rest) = body.strip_prefix("data:") {
        let (header, data) =
            rest.split_once(',').ok_or_else(|| Error::new(Reason::InvalidBase64, "data URI without a comma"))?;
        if !header.ends_with(";base64") {
            return Err(Error::new(Reason::InvalidBase64, "data URI is not base64-encoded"));
        }
        body = data;
    }
    let compact: Vec<u8> = body.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if compact.is_empty() {
        return Err(Error::new(Reason::InvalidBase64, "empty base64 image"));
    }
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine.decode(&compact).map_err(|e| Error::new(Reason::InvalidBase64, format!("invalid base64: {e}")))
}

impl ImagePreprocessor {
    /// Checks an encoded image against the byte, format and pixel limits from its header, before any decoding:
    /// its format and dimensions.
    fn check(&self, bytes: &[u8]) -> Result<(ImageFormat, u32, u32), Error> {
        if bytes.is_empty() {
            return Err(Error::new(Reason::InvalidImage, "empty image"));
        }
        if bytes.len() > self.max_bytes {
            return Err(Error::new(
                Reason::ImageTooLarge,
                format!("image of {} bytes exceeds the limit of {}", bytes.len(), self.max_bytes),
            ));
        }
        let reader = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| Error::new(Reason::InvalidImage, format!("cannot read image: {e}")))?;
        let format = reader.format().filter(|f| SUPPORTED.contains(f)).ok_or_else(|| {
            Error::new(Reason::UnsupportedImageFormat, "not a supported image (JPEG, PNG, WebP, GIF or BMP expected)")
        })?;
        if format == ImageFormat::Bmp {
            check_bmp_side(bytes)?;
        }
        let (w, h) = reader
            .into_dimensions()
            .map_err(|e| Error::new(Reason::InvalidImage, format!("cannot decode image: {e}")))?;
        let pixels = w as u64 * h as u64;
        if pixels > self.max_pixels {
            return Err(Error::new(
                Reason::ImageDimensionsTooLarge,
                format!("image of {w}x{h} pixels exceeds the limit of {} pixels", self.max_pixels),
            ));
        }
        if pixels == 0 {
            return Err(Error::new(Reason::InvalidImage, format!("image has no pixels ({w}x{h})")));
        }
        // An aspect ratio that cannot be resized is refused before any decoding work.
        resized_dims(w, h, self.size)?;
        if format == ImageFormat::Jpeg && !jpeg_has_end(bytes) {
            // libjpeg pads a truncated file with gray and only warns; Pillow refuses it ("image file is truncated").
            return Err(Error::new(
                Reason::InvalidImage,
                "cannot decode image: truncated JPEG (no end-of-image marker)",
            ));
        }
        Ok((format, w, h))
    }

    /// Decodes an encoded image into RGB, whole, enforcing the byte, format and pixel limits before decoding.
    /// `should_stop` is polled while decoding (JPEG: every few rows and scans) and between stages. This and
    /// [`ImagePreprocessor::resize_and_crop`] and [`ImagePreprocessor::normalize`] are the reference pipeline,
    /// stage by stage; [`ImagePreprocessor::preprocess`] computes the same pixels without the whole-frame buffers.
    pub fn decode(&self, bytes: &[u8], should_stop: &dyn Fn() -> bool) -> Result<RgbImage, Error> {
        let (format, w, h) = self.check(bytes)?;
        if format == ImageFormat::Jpeg {
            let limits = JpegLimits { max_scans: self.max_jpeg_scans, should_stop };
            if let Some(rgb) = jpeg::decode(bytes, self.max_pixels, &limits)? {
                return Ok(RgbImage { width: rgb.width, height: rgb.height, data: rgb.data });
            }
        }
        decode_other(bytes, format, w, h)
    }

    /// Resizes the shortest side to `size` (Pillow's bicubic) and center-crops `size` x `size`: HWC RGB bytes.
    /// Only the crop window is computed, so the cost follows the source's pixels and the output, whatever the
    /// aspect ratio.
    pub fn resize_and_crop(&self, rgb: &RgbImage) -> Result<Vec<u8>, Error> {
        let (w, h) = (rgb.width as usize, rgb.height as usize);
        let (new_w, new_h) = resized_dims(rgb.width, rgb.height, self.size)?;
        let s = self.size as usize;
        let (new_w, new_h) = (new_w as usize, new_h as usize);
        let window = Window { x0: (new_w - s) / 2, y0: (new_h - s) / 2, w: s, h: s };
        Ok(resize_rgb_window(&rgb.data, w, h, new_w, new_h, window))
    }

    /// Rescales by 1/255 and normalizes with the mean and std: CHW float32.
    pub fn normalize(&self, hwc: &[u8]) -> Vec<f32> {
        let plane = (self.size as usize) * (self.size as usize);
        let mut out = vec![0f32; 3 * plane];
        let (scale, offset) = self.normalization();
        for c in 0..3 {
            for (i, px) in hwc.chunks_exact(3).enumerate() {
                out[c * plane + i] = px[c] as f32 * scale[c] + offset[c];
            }
        }
        out
    }

    /// The whole pipeline: encoded bytes to the model's pixel tensor (CHW float32, `3 * size * size`), in the
    /// exact mode.
    pub fn preprocess(&self, bytes: &[u8]) -> Result<Vec<f32>, Error> {
        self.preprocess_until(bytes, &never_stop)
    }

    /// [`ImagePreprocessor::preprocess`], stopped (DEADLINE_EXCEEDED) as soon as `should_stop` says so.
    pub fn preprocess_until(&self, bytes: &[u8], should_stop: &dyn Fn() -> bool) -> Result<Vec<f32>, Error> {
        self.preprocess_mode_until(bytes, PreprocessMode::Exact, should_stop)
    }

    /// The whole pipeline in `mode`, stopped (DEADLINE_EXCEEDED) as soon as `should_stop` says so.
    pub fn preprocess_mode_until(
        &self,
        bytes: &[u8],
        mode: PreprocessMode,
        should_stop: &dyn Fn() -> bool,
    ) -> Result<Vec<f32>, Error> {
        self.run(bytes, mode, should_stop, None)
    }

    /// The whole pipeline in `mode`, with the time spent in each stage (a little slower than untimed).
    pub fn preprocess_timed(&self, bytes: &[u8], mode: PreprocessMode) -> Result<(Vec<f32>, StageTimes), Error> {
        let mut times = StageTimes::default();
        let pixels = self.run(bytes, mode, &never_stop, Some(&mut times))?;
        Ok((pixels, times))
    }

    /// Decodes straight into the resize: JPEG rows go through the horizontal pass as libjpeg produces them (only
    /// the rows and columns the crop window reads are decoded), the vertical pass writes the normalised tensor.
    /// The buffers are the thread's own, reused.
    fn run(
        &self,
        bytes: &[u8],
        mode: PreprocessMode,
        should_stop: &dyn Fn() -> bool,
        times: Option<&mut StageTimes>,
    ) -> Result<Vec<f32>, Error> {
        let start = times.is_some().then(Instant::now);
        let (format, w, h) = self.check(bytes)?;
        let mut timer = times.map(|t| (t, start.unwrap_or_else(Instant::now)));
        SCRATCH.with(|cell| {
            let mut own = None;
            let mut borrowed = cell.try_borrow_mut().ok();
            let scratch = match borrowed.as_deref_mut() {
                Some(s) => s,
                None => own.insert(Scratch::default()),
            };
            let result = self.run_with(scratch, bytes, format, (w, h), mode, should_stop, timer.as_mut());
            if scratch.rows.capacity() + scratch.resize.capacity() > KEPT_SCRATCH_BYTES {
                *scratch = Scratch::default();
            }
            result
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn run_with(
        &self,
        scratch: &mut Scratch,
        bytes: &[u8],
        format: ImageFormat,
        (w, h): (u32, u32),
        mode: PreprocessMode,
        should_stop: &dyn Fn() -> bool,
        mut timer: Option<&mut (&mut StageTimes, Instant)>,
    ) -> Result<Vec<f32>, Error> {
        let Scratch { rows, resize: buffers } = scratch;
        if format == ImageFormat::Jpeg {
            let limits = JpegLimits { max_scans: self.max_jpeg_scans, should_stop };
            let options = DecodeOptions { fast: mode == PreprocessMode::Fast, min_short_side: self.size };
            let mut sink = ResizeSink {
                pre: self,
                buffers: Some(&mut *buffers),
                resize: None,
                timed: timer.is_some(),
                spent: Duration::ZERO,
            };
            if jpeg::decode_rows(bytes, self.max_pixels, &limits, options, rows, &mut sink)? {
                if let Some((t, since)) = timer.as_deref_mut() {
                    let now = Instant::now();
                    t.decode += (now - *since).saturating_sub(sink.spent);
                    t.resize += sink.spent;
                    *since = now;
                }
                let resize = sink.resize.expect("the decoder asked for the region");
                return self.finish(resize, should_stop, timer);
            }
            // CMYK and YCCK: the image crate converts them.
        }
        let rgb = decode_other(bytes, format, w, h)?;
        if let Some((t, since)) = timer.as_deref_mut() {
            let now = Instant::now();
            t.decode += now - *since;
            *since = now;
        }
        if should_stop() {
            return Err(stopped());
        }
        let (iw, ih) = (rgb.width as usize, rgb.height as usize);
        let mut resize = self.window_resize(iw, ih, buffers)?;
        let needed = resize.rows();
        resize.push_rgb(needed.start, needed.len(), &rgb.data[needed.start * iw * 3..needed.end * iw * 3], iw * 3);
        drop(rgb);
        self.finish(resize, should_stop, timer)
    }

    /// The vertical pass, writing the normalised CHW tensor row by row.
    fn finish(
        &self,
        resize: WindowResize<'_>,
        should_stop: &dyn Fn() -> bool,
        timer: Option<&mut (&mut StageTimes, Instant)>,
    ) -> Result<Vec<f32>, Error> {
        if should_stop() {
            return Err(stopped());
        }
        if !resize.complete() {
            return Err(Error::new(Reason::InvalidImage, "cannot decode image: the decoder left rows out"));
        }
        let s = self.size as usize;
        let plane = s * s;
        let mut out = vec![0f32; 3 * plane];
        let (scale, offset) = self.normalization();
        let mut normalizing = Duration::ZERO;
        let timed = timer.is_some();
        resize.finish(|oy, line| {
            let t0 = timed.then(Instant::now);
            for c in 0..3 {
                let dst = &mut out[c * plane + oy * s..c * plane + (oy + 1) * s];
                for (d, &v) in dst.iter_mut().zip(&line[c * s..(c + 1) * s]) {
                    *d = v as f32 * scale[c] + offset[c];
                }
            }
            if let Some(t0) = t0 {
                normalizing += t0.elapsed();
            }
        });
        if let Some((t, since)) = timer {
            let now = Instant::now();
            t.resize += (now - *since).saturating_sub(normalizing);
            t.normalize += normalizing;
            *since = now;
        }
        Ok(out)
    }

    /// The resize of a `w` x `h` image: shortest side to `size`, centre crop.
    fn window_resize<'b>(&self, w: usize, h: usize, buffers: &'b mut ResizeBuffers) -> Result<WindowResize<'b>, Error> {
        let (new_w, new_h) = resized_dims(w as u32, h as u32, self.size)?;
        let s = self.size as usize;
        let (new_w, new_h) = (new_w as usize, new_h as usize);
        let window = Window { x0: (new_w - s) / 2, y0: (new_h - s) / 2, w: s, h: s };
        Ok(WindowResize::new(w, h, new_w, new_h, window, buffers))
    }

    /// `(x / 255 - mean) / std` as `x * scale + offset`, per channel, computed in f32 like numpy's float32 path.
    fn normalization(&self) -> ([f32; 3], [f32; 3]) {
        let scale = [0, 1, 2].map(|c| 1.0 / (255.0 * self.std[c]));
        let offset = [0, 1, 2].map(|c| -self.mean[c] / self.std[c]);
        (scale, offset)
    }
}

/// Feeds decoded JPEG rows to the resize.
struct ResizeSink<'p, 'b> {
    pre: &'p ImagePreprocessor,
    buffers: Option<&'b mut ResizeBuffers>,
    resize: Option<WindowResize<'b>>,
    timed: bool,
    /// Time spent resizing inside the decode.
    spent: Duration,
}

impl RowSink for ResizeSink<'_, '_> {
    fn region(&mut self, width: usize, height: usize) -> Result<Region, Error> {
        let buffers = self.buffers.take().expect("the region is asked once");
        let resize = self.pre.window_resize(width, height, buffers)?;
        let region = Region { rows: resize.rows(), cols: resize.cols() };
        self.resize = Some(resize);
        Ok(region)
    }

    fn rows(&mut self, y: usize, n: usize, data: &[u8], stride: usize, x0: usize) {
        let t0 = self.timed.then(Instant::now);
        self.resize.as_mut().expect("rows come after the region").push_rgbx(y, n, data, stride, x0);
        if let Some(t0) = t0 {
            self.spent += t0.elapsed();
        }
    }
}

fn stopped() -> Error {
    Error::new(Reason::DeadlineExceeded, "preprocessing stopped: the caller has gone or its deadline has passed")
}

/// Decodes a checked image of `w` x `h` pixels with the `image` crate, its allocations bounded by that size.
fn decode_other(bytes: &[u8], format: ImageFormat, w: u32, h: u32) -> Result<RgbImage, Error> {
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    // Decoded RGBA16 of the claimed size, plus slack for the decoder's own buffers.
    limits.max_alloc = Some(w as u64 * h as u64 * 8 + (64 << 20));
    reader.limits(limits);
    let image = reader.decode().map_err(|e| Error::new(Reason::InvalidImage, format!("cannot decode image: {e}")))?;
    Ok(to_rgb(image))
}

/// Output size of "shortest side to `size`", as transformers computes it: the long side is
/// `int(size * long / short)`, truncated, in double precision. Refused when the long side would exceed what
/// Pillow can resize to ([`MAX_RESIZED_SIDE`]), as it refuses it.
pub fn resized_dims(w: u32, h: u32, size: u32) -> Result<(u64, u64), Error> {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = (size as f64 * long as f64 / short as f64) as u64;
    if new_long > MAX_RESIZED_SIDE {
        return Err(Error::new(
            Reason::ImageDimensionsTooLarge,
            format!(
                "image of {w}x{h} pixels has too extreme an aspect ratio: resizing its short side to {size} gives a \
                 long side of {new_long} pixels, over the limit of {MAX_RESIZED_SIDE}"
            ),
        ));
    }
    let size = size as u64;
    Ok(if w <= h { (size, new_long) } else { (new_long, size) })
}

/// Refuses a BMP whose header claims a side the decoder does not take, with the reason and limit named.
fn check_bmp_side(bytes: &[u8]) -> Result<(), Error> {
    let le32 = |at: usize| bytes.get(at..at + 4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let le16 = |at: usize| bytes.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as i64);
    let dims = match le32(14) {
        Some(12) => le16(18).zip(le16(20)),
        Some(_) => le32(18).zip(le32(22)).map(|(w, h)| (w as i64, h as i64)),
        None => None,
    };
    match dims {
        Some((w, h)) if w.unsigned_abs().max(h.unsigned_abs()) > MAX_BMP_SIDE as u64 => Err(Error::new(
            Reason::ImageDimensionsTooLarge,
            format!("BMP image of {w}x{} pixels: BMP images are decoded up to {MAX_BMP_SIDE} pixels a side", h.abs()),
        )),
        _ => Ok(()),
    }
}

/// True when an end-of-image marker follows the last start-of-scan marker. Entropy-coded data never holds a 0xFF
/// followed by 0xD9 or 0xDA (0xFF is byte-stuffed), so the last 0xFFDA is the last scan header, and a complete file
/// has its 0xFFD9 after it; thumbnails in APP segments come before the image's own scans.
fn jpeg_has_end(bytes: &[u8]) -> bool {
    match memchr::memmem::rfind(bytes, &[0xFF, 0xDA]) {
        Some(pos) => memchr::memmem::find(&bytes[pos..], &[0xFF, 0xD9]).is_some(),
        None => false,
    }
}

/// transformers' `convert_to_rgb`: an image with an alpha channel is composited onto opaque white with Pillow's
/// `alpha_composite` arithmetic, then the alpha is dropped; others become RGB as PIL's `convert("RGB")` does (gray
/// replicated; palettes are expanded by the decoder; 16-bit samples scaled to 8 bits).
fn to_rgb(image: DynamicImage) -> RgbImage {
    let (width, height) = (image.width(), image.height());
    if !image.color().has_alpha() {
        return RgbImage { width, height, data: image.into_rgb8().into_raw() };
    }
    let rgba = image.into_rgba8().into_raw();
    let mut data = Vec::with_capacity(rgba.len() / 4 * 3);
    for px in rgba.chunks_exact(4) {
        let a = px[3] as u32;
        for &c in &px[..3] {
            data.push(over_white(c as u32, a));
        }
    }
    RgbImage { width, height, data }
}

/// One channel of Pillow's `ImagingAlphaComposite` of (c, a) over opaque white (7-bit fixed point).
fn over_white(c: u32, a: u32) -> u8 {
    if a == 0 {
        return 255;
    }
    const PRECISION_BITS: u32 = 7;
    let coef1 = a * 255 * 255 * (1 << PRECISION_BITS) / (255 * 255);
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let tmp = c * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
    ((((tmp >> 8) + tmp) >> 8) >> PRECISION_BITS) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    #[allow(clippy::excessive_precision)] // CLIP's constants, as published
    fn pre() -> ImagePreprocessor {
        ImagePreprocessor {
            size: 224,
            mean: [0.48145466, 0.4578275, 0.40821073],
            std: [0.26862954, 0.26130258, 0.27577711],
            max_bytes: 1 << 20,
            max_pixels: 10_000_000,
            max_jpeg_scans: 100,
        }
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 128]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn dims_follow_transformers_rounding() {
        assert_eq!(resized_dims(2000, 1500, 224).unwrap(), (298, 224));
        assert_eq!(resized_dims(1500, 2000, 224).unwrap(), (224, 298));
        assert_eq!(resized_dims(1, 1, 224).unwrap(), (224, 224));
        assert_eq!(resized_dims(640, 480, 224).unwrap(), (298, 224));
        assert_eq!(resized_dims(300, 1, 224).unwrap(), (67200, 224));
        // 224 * 20,000,000 does not fit in u32 (it used to saturate) nor in Pillow's int.
        assert_eq!(resized_dims(1, 9_000_000, 224).unwrap(), (224, 2_016_000_000));
        let e = resized_dims(20_000_000, 1, 224).unwrap_err();
        assert_eq!(e.reason(), Reason::ImageDimensionsTooLarge);
        assert!(e.message().contains("2147483647"), "{}", e.message());
    }

    #[test]
    fn alpha_over_white() {
        assert_eq!(over_white(10, 255), 10);
        assert_eq!(over_white(200, 255), 200);
        assert_eq!(over_white(0, 0), 255);
        assert_eq!(over_white(0, 128), 127);
        for c in 0..=255 {
            assert_eq!(over_white(c, 255), c as u8);
        }
    }

    #[test]
    fn base64_variants() {
        let raw = b"hello image bytes, long enough to wrap at seventy-six characters when encoded!!";
        let plain = base64::engine::general_purpose::STANDARD.encode(raw);
        let wrapped: String =
            plain.as_bytes().chunks(76).map(|c| format!("{}\n", std::str::from_utf8(c).unwrap())).collect();
        assert_eq!(decode_base64(&plain).unwrap(), raw);
        assert_eq!(decode_base64(&wrapped).unwrap(), raw);
        assert_eq!(decode_base64(&format!("data:image/png;base64,{plain}")).unwrap(), raw);
        assert_eq!(decode_base64(plain.trim_end_matches('=')).unwrap(), raw);
        assert!(matches!(decode_base64("not base64!"), Err(e) if e.kind() == Kind::InvalidArgument));
        assert!(matches!(decode_base64(""), Err(e) if e.kind() == Kind::InvalidArgument));
        assert!(matches!(decode_base64("data:image/png,abc"), Err(e) if e.kind() == Kind::InvalidArgument));
    }

    #[test]
    fn preprocess_shape_and_range() {
        let t = pre().preprocess(&png(300, 200)).unwrap();
        assert_eq!(t.len(), 3 * 224 * 224);
        let (lo, hi) = t.iter().fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        assert!(lo >= -1.8 && hi <= 2.2, "normalized range {lo}..{hi}");
    }

    #[test]
    fn refuses_bad_input_with_the_right_kind() {
        let p = pre();
        assert!(matches!(p.preprocess(&[]), Err(e) if e.kind() == Kind::InvalidArgument));
        assert!(matches!(p.preprocess(b"<html>not an image</html>"), Err(e) if e.kind() == Kind::InvalidArgument));
        let mut truncated = png(64, 64);
        truncated.truncate(truncated.len() / 2);
        assert!(matches!(p.preprocess(&truncated), Err(e) if e.kind() == Kind::InvalidArgument));
        let small = ImagePreprocessor { max_pixels: 100, ..pre() };
        assert!(matches!(small.preprocess(&png(11, 10)), Err(e) if e.kind() == Kind::TooLarge));
        let tiny_bytes = ImagePreprocessor { max_bytes: 10, ..pre() };
        assert!(matches!(tiny_bytes.preprocess(&png(4, 4)), Err(e) if e.kind() == Kind::TooLarge));
    }

    #[test]
    fn huge_claimed_dimensions_are_refused_from_the_header() {
        // A valid PNG header claiming 30000x30000, with no pixel data behind it.
        let mut bytes = png(1, 1);
        bytes[16..20].copy_from_slice(&30000u32.to_be_bytes());
        bytes[20..24].copy_from_slice(&30000u32.to_be_bytes());
        let crc = crc32fast::hash(&bytes[12..29]); // chunk type + IHDR data
        bytes[29..33].copy_from_slice(&crc.to_be_bytes());
        let start = std::time::Instant::now();
        assert!(matches!(pre().preprocess(&bytes), Err(e) if e.kind() == Kind::TooLarge));
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
    }
}
