//! JPEG decoding with libjpeg-turbo's decoder (the one Pillow uses, so the pixels equal Pillow's; built with its
//! SIMD code, which gives the same pixels), with its work bounded: libjpeg's progress monitor (the documented hook
//! for this) refuses files past a number of scans (progressive "scan bombs" cost scans x area) and stops the
//! decode as soon as its caller has gone or its deadline has passed, also in the middle of a large image.
//!
//! [`decode_rows`] decodes only the part of the image its caller reads (libjpeg-turbo's partial decoding) and
//! hands the rows over a block at a time, optionally DCT-scaled ([`DecodeOptions::fast`]); [`decode`] decodes the
//! whole frame (the reference).
//!
//! Written against `mozjpeg-sys` directly rather than through the `mozjpeg` crate because that crate keeps the
//! decompressor struct private, so a progress monitor cannot be installed through it.

use std::os::raw::{c_int, c_ulong};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use mozjpeg_sys as ffi;

use crate::error::{Error, Reason};

/// Work limits of one decode.
pub struct JpegLimits<'a> {
    /// Most scans (start-of-scan markers) a file may have.
    pub max_scans: u32,
    /// Polled while decoding; true stops the decode with DEADLINE_EXCEEDED.
    pub should_stop: &'a dyn Fn() -> bool,
}

/// Decoded packed RGB, or `None` for color spaces libjpeg cannot convert to RGB (CMYK, YCCK).
pub struct JpegRgb {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// Why the monitor stopped a decode.
enum Stop {
    TooManyScans,
    Cancelled,
}

/// The progress manager libjpeg calls, followed by our state. `repr(C)` with the libjpeg struct first, so the
/// pointer libjpeg holds is also a pointer to this.
#[repr(C)]
struct Monitor<'a> {
    mgr: ffi::jpeg_progress_mgr,
    max_scans: c_int,
    should_stop: &'a dyn Fn() -> bool,
    stopped: Option<Stop>,
}

/// Rows decoded per `jpeg_read_scanlines` call (the monitor runs once per call).
const ROWS_PER_CALL: usize = 16;

unsafe extern "C-unwind" fn progress_monitor(cinfo: &mut ffi::jpeg_common_struct) {
    // SAFETY: `progress` points at the `Monitor` installed by `with_decompressor`, which outlives the decode; it is
    // only installed on decompressors, so `cinfo` is the common head of a `jpeg_decompress_struct`.
    let monitor = unsafe { &mut *(cinfo.progress as *mut Monitor<'_>) };
    let scans =
        unsafe { (*(cinfo as *mut ffi::jpeg_common_struct as *const ffi::jpeg_decompress_struct)).input_scan_number };
    if scans > monitor.max_scans {
        monitor.stopped = Some(Stop::TooManyScans);
    } else if (monitor.should_stop)() {
        monitor.stopped = Some(Stop::Cancelled);
    } else {
        return;
    }
    // Unwinds to the catch_unwind in `with_decompressor` (mozjpeg-sys is built for unwinding through libjpeg's
    // frames).
    resume_unwind(Box::new(()));
}

unsafe extern "C-unwind" fn error_exit(cinfo: &mut ffi::jpeg_common_struct) {
    let mut buffer = [0u8; 80];
    // SAFETY: `err` is the error manager set up by `decode`; format_message writes a NUL-terminated message of at
    // most 80 bytes (JMSG_LENGTH_MAX). The binding declares the buffer `&[u8; 80]`, but the C side writes it.
    unsafe {
        if let Some(format) = (*cinfo.err).format_message {
            format(cinfo, &*(buffer.as_mut_ptr() as *const [u8; 80]));
        }
    }
    let text = buffer.split(|&b| b == 0).next().unwrap_or_default();
    resume_unwind(Box::new(LibjpegError(String::from_utf8_lossy(text).into_owned())));
}

unsafe extern "C-unwind" fn silence(_cinfo: &mut ffi::jpeg_common_struct, _level: c_int) {}

/// Owns a created decompressor and destroys it however the decode ends.
struct Decompressor {
    cinfo: Box<ffi::jpeg_decompress_struct>,
}

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: created by jpeg_create_decompress; destroy is valid in every state and frees libjpeg's memory.
        unsafe { ffi::jpeg_destroy_decompress(&mut self.cinfo) };
    }
}

/// How a JPEG is decoded by [`decode_rows`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    /// libjpeg-turbo's shortcuts: DCT-domain downscaling by the largest of 8, 4 or 2 that keeps the short side at
    /// least `min_short_side`, then no fancy upsampling. Off, or where no scale fits: the decode Pillow runs.
    pub fast: bool,
    /// Smallest short side a scaled decode may have (the model's input size).
    pub min_short_side: u32,
}

/// The part of a decoded image a [`RowSink`] needs: rows `rows`, columns `cols`, in output pixels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub rows: std::ops::Range<usize>,
    pub cols: std::ops::Range<usize>,
}

/// Receives the rows of a [`decode_rows`].
pub trait RowSink {
    /// The decoded size (after any scaling) is known: which part of the image is needed. An error stops the decode.
    fn region(&mut self, width: usize, height: usize) -> Result<Region, Error>;
    /// `n` decoded rows, the first being row `y`: RGBX pixels (the fourth byte is undefined), rows `stride` bytes
    /// apart, the first pixel of each row being column `x0`. Every row holds the region's columns and at least
    /// one readable pixel after them. Rows come once each, in order.
    fn rows(&mut self, y: usize, n: usize, data: &[u8], stride: usize, x0: usize);
}

/// Pixels decoded on each side of the region's columns when the decode is cropped: libjpeg's fancy upsampling
/// treats a crop's edges as the image's, so the columns next to them differ from a whole-width decode; the ones
/// further in are identical.
const CROP_MARGIN: usize = 16;

/// Rows skipped per call while jumping to the region, so that cancellation is polled.
const SKIP_ROWS_PER_CALL: u32 = 512;

/// Decodes a JPEG to RGB (gray replicated) as Pillow's `Image.open(...).convert("RGB")` does: the whole frame,
/// packed. `Ok(None)` for CMYK/YCCK files. `max_pixels` is checked again on the frame header libjpeg reads.
pub fn decode(bytes: &[u8], max_pixels: u64, limits: &JpegLimits<'_>) -> Result<Option<JpegRgb>, Error> {
    with_decompressor(bytes, max_pixels, limits, |cinfo| {
        // SAFETY: `cinfo` has read the header (see `with_decompressor`); the row pointers handed to libjpeg point
        // into `data`, which holds `height` rows of `stride` bytes.
        unsafe {
            cinfo.out_color_space = ffi::J_COLOR_SPACE::JCS_RGB;
            ffi::jpeg_start_decompress(cinfo);
            let (width, height) = (cinfo.output_width as usize, cinfo.output_height as usize);
            if cinfo.output_components != 3 {
                return Err(bad("unexpected number of color components"));
            }
            let stride = width * 3;
            let mut data = vec![0u8; stride * height];
            while (cinfo.output_scanline as usize) < height {
                let first = cinfo.output_scanline as usize;
                let count = ROWS_PER_CALL.min(height - first);
                let mut rows: [*mut u8; ROWS_PER_CALL] = [std::ptr::null_mut(); ROWS_PER_CALL];
                for (i, row) in rows.iter_mut().take(count).enumerate() {
                    *row = data.as_mut_ptr().add((first + i) * stride);
                }
                if ffi::jpeg_read_scanlines(cinfo, rows.as_mut_ptr(), count as u32) == 0 {
                    return Err(bad("truncated JPEG"));
                }
            }
            ffi::jpeg_finish_decompress(cinfo);
            Ok(JpegRgb { width: width as u32, height: height as u32, data })
        }
    })
}

/// Decodes the part of a JPEG that `sink` asks for and hands it the rows, a few at a time, in RGBX; rows and
/// columns outside the region are not converted (libjpeg's `jpeg_crop_scanline` and `jpeg_skip_scanlines`), and
/// the rows after it not decoded at all. The pixels of the region equal those of a whole-frame decode with the
/// same options. `buffer` holds the rows between calls (reused). `Ok(false)` for CMYK/YCCK files, which are not
/// decoded. Errors, limits and cancellation as [`decode`].
pub fn decode_rows(
    bytes: &[u8],
    max_pixels: u64,
    limits: &JpegLimits<'_>,
    options: DecodeOptions,
    buffer: &mut Vec<u8>,
    sink: &mut dyn RowSink,
) -> Result<bool, Error> {
    let decoded = with_decompressor(bytes, max_pixels, limits, |cinfo| {
        // SAFETY: `cinfo` has read the header (see `with_decompressor`); the row pointers handed to libjpeg point
        // into `buffer`, which holds ROWS_PER_CALL rows of `stride` bytes, each at least `4 * output_width`.
        unsafe {
            cinfo.out_color_space = ffi::J_COLOR_SPACE::JCS_EXT_RGBX;
            if options.fast && choose_scale(cinfo, options.min_short_side) {
                // Measured: a little faster at these scales. The fast IDCT is not used: the scaled IDCTs ignore
                // it, and unscaled images are decoded as in the exact mode (it gained nothing measurable there).
                cinfo.do_fancy_upsampling = 0;
            }
            ffi::jpeg_start_decompress(cinfo);
            if cinfo.output_components != 4 {
                return Err(bad("unexpected number of color components"));
            }
            let (width, height) = (cinfo.output_width as usize, cinfo.output_height as usize);
            let region = sink.region(width, height)?;
            let Region { rows, cols } = region;
            assert!(
                rows.start < rows.end && rows.end <= height && cols.start < cols.end && cols.end <= width,
                "region {rows:?} x {cols:?} outside the {width}x{height} image"
            );
            let mut x0 = cols.start.saturating_sub(CROP_MARGIN) as ffi::JDIMENSION;
            let mut crop_width = ((cols.end + CROP_MARGIN).min(width) - x0 as usize) as ffi::JDIMENSION;
            ffi::jpeg_crop_scanline(cinfo, &mut x0, &mut crop_width);
            let (x0, crop_width) = (x0 as usize, crop_width as usize);
            debug_assert!(x0 <= cols.start && x0 + crop_width >= cols.end);
            let stride = (crop_width + 2) * 4;
            if buffer.len() < ROWS_PER_CALL * stride {
                buffer.resize(ROWS_PER_CALL * stride, 0);
            }
            while (cinfo.output_scanline as usize) < rows.start {
                if (limits.should_stop)() {
                    resume_unwind(Box::new(Cancelled));
                }
                let left = (rows.start - cinfo.output_scanline as usize) as u32;
                ffi::jpeg_skip_scanlines(cinfo, left.min(SKIP_ROWS_PER_CALL));
            }
            while (cinfo.output_scanline as usize) < rows.end {
                let first = cinfo.output_scanline as usize;
                let count = ROWS_PER_CALL.min(rows.end - first);
                let mut done = 0;
                while done < count {
                    let mut ptrs: [*mut u8; ROWS_PER_CALL] = [std::ptr::null_mut(); ROWS_PER_CALL];
                    for (i, row) in ptrs.iter_mut().take(count - done).enumerate() {
                        *row = buffer.as_mut_ptr().add((done + i) * stride);
                    }
                    let read = ffi::jpeg_read_scanlines(cinfo, ptrs.as_mut_ptr(), (count - done) as u32) as usize;
                    if read == 0 {
                        return Err(bad("truncated JPEG"));
                    }
                    done += read;
                }
                sink.rows(first, count, &buffer[..count * stride], stride, x0);
            }
            if rows.end == height {
                ffi::jpeg_finish_decompress(cinfo);
            }
            // Otherwise the rest is never decoded: dropping the decompressor aborts it.
            Ok(())
        }
    })?;
    Ok(decoded.is_some())
}

/// The unwinding payload that stops a decode whose caller has gone.
struct Cancelled;

/// The unwinding payload of libjpeg's fatal errors: its message.
struct LibjpegError(String);

fn bad(m: &str) -> Error {
    Error::new(Reason::InvalidImage, format!("cannot decode image: {m}"))
}

/// Picks the largest DCT-domain downscaling (1/8, 1/4, 1/2) whose output keeps the short side at least
/// `min_short_side`: true when one does.
///
/// # Safety
/// `cinfo` must have read the header and not have started decompressing.
unsafe fn choose_scale(cinfo: &mut ffi::jpeg_decompress_struct, min_short_side: u32) -> bool {
    for denom in [8, 4, 2] {
        cinfo.scale_num = 1;
        cinfo.scale_denom = denom;
        // SAFETY: as the caller guarantees; this only computes the output dimensions.
        unsafe { ffi::jpeg_calc_output_dimensions(cinfo) };
        if cinfo.output_width.min(cinfo.output_height) >= min_short_side {
            return true;
        }
    }
    cinfo.scale_num = 1;
    cinfo.scale_denom = 1;
    false
}

/// Sets up a decompressor on `bytes` with the error handler, the scan limit and cancellation, reads the header,
/// refuses a frame over `max_pixels`, and runs `f` on it: `Ok(None)` for CMYK/YCCK files (left to the caller).
/// libjpeg's errors, the scan limit and cancellation unwind out of libjpeg (and out of `f`) to here and become
/// the matching errors; the decompressor is destroyed however it ends.
fn with_decompressor<T>(
    bytes: &[u8],
    max_pixels: u64,
    limits: &JpegLimits<'_>,
    f: impl FnOnce(&mut ffi::jpeg_decompress_struct) -> Result<T, Error>,
) -> Result<Option<T>, Error> {
    let mut err: Box<ffi::jpeg_error_mgr> = Box::new(unsafe { std::mem::zeroed() });
    // SAFETY: jpeg_std_error fills in the defaults of a zeroed error manager.
    unsafe { ffi::jpeg_std_error(&mut err) };
    err.error_exit = Some(error_exit);
    err.emit_message = Some(silence);
    let mut monitor = Box::new(Monitor {
        mgr: ffi::jpeg_progress_mgr {
            progress_monitor: Some(progress_monitor),
            pass_counter: 0,
            pass_limit: 0,
            completed_passes: 0,
            total_passes: 0,
        },
        max_scans: limits.max_scans.min(c_int::MAX as u32) as c_int,
        should_stop: limits.should_stop,
        stopped: None,
    });
    let result = catch_unwind(AssertUnwindSafe(|| -> Result<Option<T>, Error> {
        // SAFETY: the decompressor lives in a Box (a stable address), its error and progress managers outlive
        // it (dropped after `dec`), and `bytes` outlives the decode. Errors unwind out of libjpeg to the
        // catch_unwind around this closure, and `dec`'s Drop destroys the decompressor on every path.
        unsafe {
            let mut dec = Decompressor { cinfo: Box::new(std::mem::zeroed()) };
            dec.cinfo.common.err = &mut *err;
            ffi::jpeg_create_decompress(&mut *dec.cinfo);
            dec.cinfo.common.progress = &mut monitor.mgr;
            ffi::jpeg_mem_src(&mut dec.cinfo, bytes.as_ptr(), bytes.len() as c_ulong);
            ffi::jpeg_read_header(&mut dec.cinfo, 1);
            if matches!(dec.cinfo.jpeg_color_space, ffi::J_COLOR_SPACE::JCS_CMYK | ffi::J_COLOR_SPACE::JCS_YCCK) {
                return Ok(None);
            }
            let (w, h) = (dec.cinfo.image_width as u64, dec.cinfo.image_height as u64);
            if w * h > max_pixels || w == 0 || h == 0 {
                return Err(Error::new(
                    Reason::ImageDimensionsTooLarge,
                    format!("image of {w}x{h} pixels exceeds the limit of {max_pixels} pixels"),
                ));
            }
            f(&mut dec.cinfo).map(Some)
        }
    }));
    match result {
        Ok(r) => r,
        Err(payload) => Err(match monitor.stopped {
            Some(Stop::TooManyScans) => Error::new(
                Reason::ImageTooComplex,
                format!("JPEG has more than {} scans (the limit, --max-jpeg-scans)", limits.max_scans),
            ),
            Some(Stop::Cancelled) => cancelled(),
            None if payload.is::<Cancelled>() => cancelled(),
            None => match payload.downcast::<LibjpegError>() {
                Ok(e) => bad(&e.0),
                // A panic of the caller's code (a sink): not a decoding error, so it goes on unwinding.
                Err(payload) => resume_unwind(payload),
            },
        }),
    }
}

fn cancelled() -> Error {
    Error::new(Reason::DeadlineExceeded, "decoding stopped: the caller has gone or its deadline has passed")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inputs::resample::tests::Rng;

    /// Chroma subsampling of a test JPEG: (h, v) pixels per chroma sample, or gray.
    #[derive(Debug, Clone, Copy)]
    enum Kind {
        Gray,
        Color(u8, u8),
    }

    fn encode(rng: &mut Rng, w: usize, h: usize, kind: Kind, progressive: bool) -> Vec<u8> {
        let (space, channels) = match kind {
            Kind::Gray => (mozjpeg::ColorSpace::JCS_GRAYSCALE, 1),
            Kind::Color(..) => (mozjpeg::ColorSpace::JCS_RGB, 3),
        };
        let mut c = mozjpeg::Compress::new(space);
        c.set_fastest_defaults();
        c.set_size(w, h);
        c.set_quality(rng.range(60, 95) as f32);
        if let Kind::Color(sh, sv) = kind {
            c.set_chroma_sampling_pixel_sizes((sh, sv), (sh, sv));
        }
        if progressive {
            c.set_progressive_mode();
        }
        let mut started = c.start_compress(Vec::new()).unwrap();
        // Smooth colour fields with sharp edges and noise: chroma that upsampling has to interpolate.
        let mut pixels = vec![0u8; w * h * channels];
        let (fx, fy) = (rng.range(1, 9), rng.range(1, 9));
        for y in 0..h {
            for x in 0..w {
                for ch in 0..channels {
                    let edge = if (x * fx / w.max(1) + y * fy / h.max(1)) % 2 == 0 { 60 } else { 0 };
                    let v = (x * (ch + 1) * 255 / w.max(1) + y * 128 / h.max(1) + edge) as u64 + rng.next() % 24;
                    pixels[(y * w + x) * channels + ch] = v as u8;
                }
            }
        }
        started.write_scanlines(&pixels).unwrap();
        started.finish().unwrap()
    }

    /// Collects the RGB of a region as a [`RowSink`].
    struct Collect {
        want: Option<Region>,
        size: (usize, usize),
        region: Option<Region>,
        rgb: Vec<u8>,
        next_row: usize,
    }

    impl RowSink for Collect {
        fn region(&mut self, width: usize, height: usize) -> Result<Region, Error> {
            self.size = (width, height);
            let r = self.want.clone().unwrap_or(Region { rows: 0..height, cols: 0..width });
            self.next_row = r.rows.start;
            self.region = Some(r.clone());
            Ok(r)
        }

        fn rows(&mut self, y: usize, n: usize, data: &[u8], stride: usize, x0: usize) {
            let r = self.region.clone().unwrap();
            assert_eq!(y, self.next_row, "rows in order, once each");
            assert!(y >= r.rows.start && y + n <= r.rows.end);
            for k in 0..n {
                let row = &data[k * stride..];
                assert!(row.len() >= (r.cols.end + 1 - x0) * 4, "a readable pixel after the columns");
                for x in r.cols.clone() {
                    self.rgb.extend_from_slice(&row[(x - x0) * 4..(x - x0) * 4 + 3]);
                }
            }
            self.next_row += n;
        }
    }

    fn never() -> bool {
        false
    }

    fn rows_of(bytes: &[u8], fast: bool, want: Option<Region>) -> Result<Collect, Error> {
        let limits = JpegLimits { max_scans: 100, should_stop: &never };
        let options = DecodeOptions { fast, min_short_side: 32 };
        let mut sink = Collect { want, size: (0, 0), region: None, rgb: Vec::new(), next_row: 0 };
        assert!(decode_rows(bytes, u64::MAX, &limits, options, &mut Vec::new(), &mut sink)?);
        assert_eq!(sink.next_row, sink.region.as_ref().unwrap().rows.end, "every row of the region");
        Ok(sink)
    }

    const KINDS: [Kind; 6] =
        [Kind::Gray, Kind::Color(1, 1), Kind::Color(2, 1), Kind::Color(1, 2), Kind::Color(2, 2), Kind::Color(4, 1)];

    #[test]
    fn whole_frame_rows_equal_the_reference_decode() {
        let mut rng = Rng(11);
        for (i, &kind) in KINDS.iter().enumerate() {
            for progressive in [false, true] {
                let (w, h) = (rng.range(1, 300), rng.range(1, 300));
                let bytes = encode(&mut rng, w, h, kind, progressive);
                let limits = JpegLimits { max_scans: 100, should_stop: &never };
                let reference = decode(&bytes, u64::MAX, &limits).unwrap().unwrap();
                let rows = rows_of(&bytes, false, None).unwrap();
                assert_eq!(rows.size, (w, h));
                assert!(rows.rgb == reference.data, "case {i}: {kind:?} {w}x{h} progressive {progressive}");
            }
        }
    }

    /// Cropped and skipped decodes give the region's pixels of a whole-frame decode, in both modes: the property
    /// the exact mode's parity rests on.
    #[test]
    fn regions_equal_the_whole_frame() {
        let mut rng = Rng(12);
        for case in 0..160 {
            let kind = KINDS[case % KINDS.len()];
            let progressive = case % 5 == 0;
            let fast = case % 3 == 0;
            let (w, h) = (rng.range(1, 520), rng.range(1, 520));
            let bytes = encode(&mut rng, w, h, kind, progressive);
            let full = rows_of(&bytes, fast, None).unwrap();
            let (fw, fh) = full.size;
            let (c0, r0) = (rng.range(0, fw - 1), rng.range(0, fh - 1));
            let region = Region { rows: r0..rng.range(r0 + 1, fh), cols: c0..rng.range(c0 + 1, fw) };
            let part = rows_of(&bytes, fast, Some(region.clone())).unwrap();
            let mut want = Vec::new();
            for y in region.rows.clone() {
                want.extend_from_slice(&full.rgb[(y * fw + region.cols.start) * 3..(y * fw + region.cols.end) * 3]);
            }
            assert!(
                part.rgb == want,
                "case {case}: {kind:?} {w}x{h} progressive {progressive} fast {fast}, region {region:?}"
            );
        }
    }

    #[test]
    fn fast_decodes_at_the_smallest_scale_that_covers_the_input() {
        let mut rng = Rng(13);
        let limits = JpegLimits { max_scans: 100, should_stop: &never };
        for ((w, h), want) in [
            ((3000, 2000), (375, 250)),
            ((640, 480), (320, 240)),
            ((1280, 960), (320, 240)),
            ((447, 600), (224, 300)),
            ((446, 600), (446, 600)),
            ((224, 224), (224, 224)),
            ((100, 50), (100, 50)),
        ] {
            let bytes = encode(&mut rng, w, h, Kind::Color(2, 2), false);
            let options = DecodeOptions { fast: true, min_short_side: 224 };
            let mut sink = Collect { want: None, size: (0, 0), region: None, rgb: Vec::new(), next_row: 0 };
            assert!(decode_rows(&bytes, u64::MAX, &limits, options, &mut Vec::new(), &mut sink).unwrap());
            assert_eq!(sink.size, want, "{w}x{h}");
            let options = DecodeOptions { fast: false, min_short_side: 224 };
            let mut sink = Collect { want: None, size: (0, 0), region: None, rgb: Vec::new(), next_row: 0 };
            assert!(decode_rows(&bytes, u64::MAX, &limits, options, &mut Vec::new(), &mut sink).unwrap());
            assert_eq!(sink.size, (w, h), "exact decodes never scale");
        }
    }

    #[test]
    fn limits_and_cancellation_hold_for_region_decodes() {
        let mut rng = Rng(14);
        let bytes = encode(&mut rng, 400, 300, Kind::Color(2, 2), true);
        for fast in [false, true] {
            let options = DecodeOptions { fast, min_short_side: 32 };
            let sink = || Collect { want: None, size: (0, 0), region: None, rgb: Vec::new(), next_row: 0 };
            let few_scans = JpegLimits { max_scans: 2, should_stop: &never };
            let e = decode_rows(&bytes, u64::MAX, &few_scans, options, &mut Vec::new(), &mut sink()).unwrap_err();
            assert_eq!(e.reason(), Reason::ImageTooComplex);
            let stop = || true;
            let stopped = JpegLimits { max_scans: 100, should_stop: &stop };
            let e = decode_rows(&bytes, u64::MAX, &stopped, options, &mut Vec::new(), &mut sink()).unwrap_err();
            assert_eq!(e.reason(), Reason::DeadlineExceeded);
            let limits = JpegLimits { max_scans: 100, should_stop: &never };
            let e = decode_rows(&bytes, 400 * 300 - 1, &limits, options, &mut Vec::new(), &mut sink()).unwrap_err();
            assert_eq!(e.reason(), Reason::ImageDimensionsTooLarge);
            let mut cut = bytes[..bytes.len() / 2].to_vec();
            cut.extend_from_slice(&[0xFF, 0xD9]);
            // A file cut short decodes (libjpeg fills in) or fails as invalid, never otherwise.
            if let Err(e) = decode_rows(&cut, u64::MAX, &limits, options, &mut Vec::new(), &mut sink()) {
                assert_eq!(e.reason(), Reason::InvalidImage);
            }
        }
        // Skipping to a region far down polls cancellation too.
        let tall = encode(&mut rng, 16, 5000, Kind::Color(2, 2), false);
        let calls = std::cell::Cell::new(0);
        let stop_later = || {
            calls.set(calls.get() + 1);
            calls.get() > 3
        };
        let limits = JpegLimits { max_scans: 100, should_stop: &stop_later };
        let options = DecodeOptions { fast: false, min_short_side: 32 };
        let mut sink = Collect {
            want: Some(Region { rows: 4990..5000, cols: 0..16 }),
            size: (0, 0),
            region: None,
            rgb: Vec::new(),
            next_row: 0,
        };
        let e = decode_rows(&tall, u64::MAX, &limits, options, &mut Vec::new(), &mut sink).unwrap_err();
        assert_eq!(e.reason(), Reason::DeadlineExceeded);
    }

    #[test]
    fn a_panicking_sink_is_not_taken_for_a_decoding_error() {
        struct Panics;
        impl RowSink for Panics {
            fn region(&mut self, width: usize, height: usize) -> Result<Region, Error> {
                Ok(Region { rows: 0..height, cols: 0..width })
            }
            fn rows(&mut self, _: usize, _: usize, _: &[u8], _: usize, _: usize) {
                panic!("sink bug");
            }
        }
        let mut rng = Rng(15);
        let bytes = encode(&mut rng, 64, 64, Kind::Color(2, 2), false);
        let limits = JpegLimits { max_scans: 100, should_stop: &never };
        let options = DecodeOptions { fast: false, min_short_side: 32 };
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            decode_rows(&bytes, u64::MAX, &limits, options, &mut Vec::new(), &mut Panics)
        }));
        let payload = r.expect_err("the panic goes on");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"sink bug"));
    }

    #[test]
    fn cmyk_is_left_to_the_caller() {
        let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_CMYK);
        c.set_size(8, 8);
        let mut started = c.start_compress(Vec::new()).unwrap();
        started.write_scanlines(&[100u8; 8 * 8 * 4]).unwrap();
        let bytes = started.finish().unwrap();
        let limits = JpegLimits { max_scans: 100, should_stop: &never };
        let options = DecodeOptions { fast: true, min_short_side: 4 };
        let mut sink = Collect { want: None, size: (0, 0), region: None, rgb: Vec::new(), next_row: 0 };
        assert!(!decode_rows(&bytes, u64::MAX, &limits, options, &mut Vec::new(), &mut sink).unwrap());
        assert!(sink.region.is_none());
    }
}
