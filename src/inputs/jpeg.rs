//! JPEG decoding with libjpeg-turbo's decoder (the one Pillow uses, so the pixels equal Pillow's), with its work
//! bounded: libjpeg's progress monitor (the documented hook for this) refuses files past a number of scans
//! (progressive "scan bombs" cost scans x area) and stops the decode as soon as its caller has gone or its
//! deadline has passed, also in the middle of a large image.
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
    // SAFETY: `progress` points at the `Monitor` installed by `decode`, which outlives the decode; the monitor is
    // only installed on a decompressor, so `cinfo` is the common head of a `jpeg_decompress_struct`.
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
    // Unwinds to the catch_unwind in `decode` (mozjpeg-sys is built for unwinding through libjpeg's frames).
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
    resume_unwind(Box::new(String::from_utf8_lossy(text).into_owned()));
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

/// Decodes a JPEG to RGB (gray replicated) as Pillow's `Image.open(...).convert("RGB")` does. `Ok(None)` for
/// CMYK/YCCK files. `max_pixels` is checked again on the frame header libjpeg reads.
pub fn decode(bytes: &[u8], max_pixels: u64, limits: &JpegLimits<'_>) -> Result<Option<JpegRgb>, Error> {
    let bad = |m: &str| Error::new(Reason::InvalidImage, format!("cannot decode image: {m}"));
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
    let result = catch_unwind(AssertUnwindSafe(|| -> Result<Option<JpegRgb>, Error> {
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
            dec.cinfo.out_color_space = ffi::J_COLOR_SPACE::JCS_RGB;
            ffi::jpeg_start_decompress(&mut dec.cinfo);
            let (width, height) = (dec.cinfo.output_width as usize, dec.cinfo.output_height as usize);
            if dec.cinfo.output_components != 3 {
                return Err(bad("unexpected number of color components"));
            }
            let stride = width * 3;
            let mut data = vec![0u8; stride * height];
            while (dec.cinfo.output_scanline as usize) < height {
                let first = dec.cinfo.output_scanline as usize;
                let count = ROWS_PER_CALL.min(height - first);
                let mut rows: [*mut u8; ROWS_PER_CALL] = [std::ptr::null_mut(); ROWS_PER_CALL];
                for (i, row) in rows.iter_mut().take(count).enumerate() {
                    *row = data.as_mut_ptr().add((first + i) * stride);
                }
                let read = ffi::jpeg_read_scanlines(&mut dec.cinfo, rows.as_mut_ptr(), count as u32);
                if read == 0 {
                    return Err(bad("truncated JPEG"));
                }
            }
            ffi::jpeg_finish_decompress(&mut dec.cinfo);
            Ok(Some(JpegRgb { width: width as u32, height: height as u32, data }))
        }
    }));
    match result {
        Ok(r) => r,
        Err(payload) => Err(match monitor.stopped {
            Some(Stop::TooManyScans) => Error::new(
                Reason::ImageTooComplex,
                format!("JPEG has more than {} scans (the limit, --max-jpeg-scans)", limits.max_scans),
            ),
            Some(Stop::Cancelled) => {
                Error::new(Reason::DeadlineExceeded, "decoding stopped: the caller has gone or its deadline has passed")
            }
            None => bad(payload.downcast_ref::<String>().map(String::as_str).unwrap_or("corrupt JPEG")),
        }),
    }
}
