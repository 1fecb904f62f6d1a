//! Bicubic resampling that reproduces Pillow's `Image.resize(..., BICUBIC)` bit for bit on 8-bit RGB.
//!
//! Written by hand rather than taken from an image-resizing crate because CLIP parity needs Pillow's exact
//! arithmetic: its coefficient rounding (22-bit fixed point), its pass order (horizontal first, then vertical)
//! and its clipping of the intermediate image to 8 bits. A general resizer that runs the passes in the other order
//! differs by up to tens of levels on high-contrast content (dithered palettes), where the bicubic overshoot is
//! clipped at a different stage. Only the output pixels inside the crop window are computed: each output pixel
//! depends on the source alone, so the result equals resizing everything and cropping afterwards.

const PRECISION_BITS: u32 = 32 - 8 - 2;
#[cfg(target_arch = "x86_64")]
const PRECISION_BITS_I32: i32 = PRECISION_BITS as i32;
const SUPPORT: f64 = 2.0;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// For output coordinates `first..first + bounds.len()`: the first input index, the number of taps, and
/// fixed-point weights.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for an input of `in_size` resized to `out_size`, for
/// the `count` output coordinates starting at `first` only: the cost follows what is produced, not `out_size`
/// (which an extreme aspect ratio makes billions).
fn precompute(in_size: usize, out_size: usize, first: usize, count: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(count);
    let mut weights = vec![0i32; count * ksize];
    let mut k = vec![0f64; ksize];
    for (i, xx) in (first..first + count).enumerate() {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) conversion truncates toward zero
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for x in 0..xmax {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            let fixed = w * (1u32 << PRECISION_BITS) as f64;
            weights[i * ksize + x] = if w < 0.0 { (-0.5 + fixed) as i32 } else { (0.5 + fixed) as i32 };
        }
        bounds.push((xmin, xmax));
    }
    Coeffs { ksize, bounds, weights }
}

#[inline]
fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// A window of a resized image: output columns `x0..x0+w` and rows `y0..y0+h`.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub x0: usize,
    pub y0: usize,
    pub w: usize,
    pub h: usize,
}

/// Resizes packed RGB `src` (`sw` x `sh`) to `dw` x `dh` with Pillow's bicubic, returning only `window` of the
/// result as packed RGB.
pub fn resize_rgb_window(src: &[u8], sw: usize, sh: usize, dw: usize, dh: usize, window: Window) -> Vec<u8> {
    assert_eq!(src.len(), sw * sh * 3, "source buffer size");
    assert!(window.x0 + window.w <= dw && window.y0 + window.h <= dh, "window outside the output");
    let need_h = dw != sw;
    let need_v = dh != sh;
    let vert = need_v.then(|| precompute(sh, dh, window.y0, window.h));
    // Rows of the source the vertical pass reads for the window's rows.
    let (row_first, row_last) = match &vert {
        Some(c) => {
            let (first, _) = c.bounds[0];
            let (lmin, lcount) = c.bounds[window.h - 1];
            (first, lmin + lcount)
        }
        None => (window.y0, window.y0 + window.h),
    };
    // Horizontal pass over those rows, for the window's columns only: `tmp` is (row_last - row_first) x w.
    let rows = row_last - row_first;
    let mut tmp = vec![0u8; rows * window.w * 3];
    if need_h {
        let c = precompute(sw, dw, window.x0, window.w);
        let half = 1i32 << (PRECISION_BITS - 1);
        for r in 0..rows {
            let line = &src[(row_first + r) * sw * 3..(row_first + r + 1) * sw * 3];
            let out = &mut tmp[r * window.w * 3..(r + 1) * window.w * 3];
            for ox in 0..window.w {
                let (xmin, count) = c.bounds[ox];
                let k = &c.weights[ox * c.ksize..ox * c.ksize + count];
                let (mut s0, mut s1, mut s2) = (half, half, half);
                for (i, &w) in k.iter().enumerate() {
                    let p = (xmin + i) * 3;
                    s0 += line[p] as i32 * w;
                    s1 += line[p + 1] as i32 * w;
                    s2 += line[p + 2] as i32 * w;
                }
                out[ox * 3] = clip8(s0);
                out[ox * 3 + 1] = clip8(s1);
                out[ox * 3 + 2] = clip8(s2);
            }
        }
    } else {
        for r in 0..rows {
            let line = &src[(row_first + r) * sw * 3..(row_first + r + 1) * sw * 3];
            tmp[r * window.w * 3..(r + 1) * window.w * 3]
                .copy_from_slice(&line[window.x0 * 3..(window.x0 + window.w) * 3]);
        }
    }
    let Some(c) = vert else {
        // No vertical pass: the rows read are exactly the window's rows.
        return tmp;
    };
    let stride = window.w * 3;
    let mut out = vec![0u8; window.h * stride];
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut acc = vec![0i32; stride];
    for oy in 0..window.h {
        let (ymin, count) = c.bounds[oy];
        let k = &c.weights[oy * c.ksize..oy * c.ksize + count];
        acc.fill(half);
        for (i, &w) in k.iter().enumerate() {
            let row = &tmp[(ymin - row_first + i) * stride..(ymin - row_first + i + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as i32 * w;
            }
        }
        for (o, &a) in out[oy * stride..(oy + 1) * stride].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// Bytes per pixel of the rows a [`WindowResize`] reads: R, G, B and one byte that is ignored (libjpeg's
/// `JCS_EXT_RGBX`, Pillow's own 4-byte layout of RGB images).
pub const RGBX: usize = 4;

/// Horizontal coefficients laid out for the vectorised pass: for each output column, its first source column, its
/// number of tap pairs, and per pair 8 lanes `[w0, w0, w0, 0, w1, w1, w1, 0]` that line up with two RGBX pixels
/// (an odd tap count ends with a zero weight, so that pair reads one pixel past the taps).
struct HorizontalTaps {
    first: Vec<usize>,
    pairs: Vec<usize>,
    lanes: Vec<i32>,
    /// Lanes per output column.
    stride: usize,
}

impl HorizontalTaps {
    fn new(c: &Coeffs) -> Self {
        let stride = c.ksize.div_ceil(2) * 8;
        let mut lanes = vec![0i32; c.bounds.len() * stride];
        let (mut first, mut pairs) = (Vec::with_capacity(c.bounds.len()), Vec::with_capacity(c.bounds.len()));
        for (ox, &(xmin, count)) in c.bounds.iter().enumerate() {
            for t in 0..count {
                let at = ox * stride + (t / 2) * 8 + (t % 2) * 4;
                lanes[at..at + 3].fill(c.weights[ox * c.ksize + t]);
            }
            first.push(xmin);
            pairs.push(count.div_ceil(2));
        }
        HorizontalTaps { first, pairs, lanes, stride }
    }
}

/// Coefficients of one axis, shared by the resizes of a thread that have the same geometry.
struct Axis<T> {
    key: (usize, usize, usize, usize),
    taps: std::rc::Rc<T>,
}

thread_local! {
    /// The last few coefficient sets computed on this thread (photos come in a handful of sizes).
    static HORIZONTAL: std::cell::RefCell<Vec<Axis<HorizontalTaps>>> = const { std::cell::RefCell::new(Vec::new()) };
    static VERTICAL: std::cell::RefCell<Vec<Axis<Coeffs>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Coefficient sets kept per thread and axis.
const CACHED_AXES: usize = 4;

fn cached<T>(
    cache: &'static std::thread::LocalKey<std::cell::RefCell<Vec<Axis<T>>>>,
    key: (usize, usize, usize, usize),
    make: impl FnOnce() -> T,
) -> std::rc::Rc<T> {
    cache.with(|c| {
        let mut c = c.borrow_mut();
        if let Some(i) = c.iter().position(|a| a.key == key) {
            let hit = c.remove(i);
            let taps = hit.taps.clone();
            c.insert(0, hit);
            return taps;
        }
        let taps = std::rc::Rc::new(make());
        c.insert(0, Axis { key, taps: taps.clone() });
        c.truncate(CACHED_AXES);
        taps
    })
}

/// Buffers of a [`WindowResize`], kept by the caller between images.
#[derive(Default)]
pub struct ResizeBuffers {
    /// The horizontal pass's output: one planar row (`R..., G..., B...`) per source row read.
    tmp: Vec<u8>,
    /// One RGBX row block, for sources that come as packed RGB.
    rgbx: Vec<u8>,
    /// One output row, planar.
    line: Vec<u8>,
}

impl ResizeBuffers {
    /// Bytes held.
    pub fn capacity(&self) -> usize {
        self.tmp.capacity() + self.rgbx.capacity() + self.line.capacity()
    }
}

/// Pillow's bicubic resize of a `sw` x `sh` source to `dw` x `dh`, computing only `window` of the output, fed one
/// block of source rows at a time (as a decoder produces them) and handing out the window's rows as planar 8-bit
/// rows. Bit for bit what [`resize_rgb_window`] computes (the reference): the same integer arithmetic, summed in
/// another order, vectorised (AVX2 where the CPU has it, checked at run time).
///
/// The source rows read are [`WindowResize::rows`] and, of each, the columns [`WindowResize::cols`]: a decoder
/// may leave out the rest.
pub struct WindowResize<'b> {
    window: Window,
    horizontal: Option<std::rc::Rc<HorizontalTaps>>,
    vertical: Option<std::rc::Rc<Coeffs>>,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    /// Source rows received so far.
    received: usize,
    buffers: &'b mut ResizeBuffers,
}

impl<'b> WindowResize<'b> {
    pub fn new(sw: usize, sh: usize, dw: usize, dh: usize, window: Window, buffers: &'b mut ResizeBuffers) -> Self {
        assert!(sw > 0 && sh > 0 && window.w > 0 && window.h > 0, "empty resize");
        assert!(window.x0 + window.w <= dw && window.y0 + window.h <= dh, "window outside the output");
        let horizontal = (dw != sw).then(|| {
            let key = (sw, dw, window.x0, window.w);
            cached(&HORIZONTAL, key, || HorizontalTaps::new(&precompute(sw, dw, window.x0, window.w)))
        });
        let vertical = (dh != sh).then(|| {
            let key = (sh, dh, window.y0, window.h);
            cached(&VERTICAL, key, || precompute(sh, dh, window.y0, window.h))
        });
        let rows = match &vertical {
            Some(c) => c.bounds[0].0..c.bounds[window.h - 1].0 + c.bounds[window.h - 1].1,
            None => window.y0..window.y0 + window.h,
        };
        let cols = match &horizontal {
            Some(t) => {
                let last = window.w - 1;
                // The last pair of an odd tap count reads one pixel more, with a zero weight.
                let end = (0..window.w).map(|ox| t.first[ox] + t.pairs[ox] * 2).max().unwrap_or(t.first[last] + 1);
                t.first[0]..end.min(sw)
            }
            None => window.x0..window.x0 + window.w,
        };
        let tmp_len = rows.len() * 3 * window.w;
        buffers.tmp.clear();
        buffers.tmp.resize(tmp_len, 0);
        WindowResize { window, horizontal, vertical, rows, cols, received: 0, buffers }
    }

    /// Source rows the resize reads.
    pub fn rows(&self) -> std::ops::Range<usize> {
        self.rows.clone()
    }

    /// Source columns the resize reads. A row handed to [`WindowResize::push_rgbx`] must also hold one readable
    /// pixel after them (its value does not matter).
    pub fn cols(&self) -> std::ops::Range<usize> {
        self.cols.clone()
    }

    /// True once every source row the resize reads has been pushed.
    pub fn complete(&self) -> bool {
        self.received == self.rows.len()
    }

    /// Source rows `y..y + n` as RGBX, rows `stride` bytes apart, the first pixel of each being column `x0`; rows
    /// outside [`WindowResize::rows`] are ignored. Each row read must be pushed exactly once.
    pub fn push_rgbx(&mut self, y: usize, n: usize, data: &[u8], stride: usize, x0: usize) {
        let first = y.max(self.rows.start);
        let end = (y + n).min(self.rows.end);
        if first >= end {
            return;
        }
        assert!(x0 <= self.cols.start, "rows start after the columns read");
        let data = &data[(first - y) * stride..];
        let count = end - first;
        let line = 3 * self.window.w;
        let out = &mut self.buffers.tmp[(first - self.rows.start) * line..(end - self.rows.start) * line];
        match &self.horizontal {
            Some(taps) => {
                let need = (count - 1) * stride + (self.cols.end + 1 - x0) * RGBX;
                assert!(data.len() >= need, "rows shorter than the columns read");
                horizontal(taps, &data[..need], stride, x0, out, self.window.w);
            }
            None => {
                for r in 0..count {
                    let row = &data[r * stride + (self.window.x0 - x0) * RGBX..][..self.window.w * RGBX];
                    let (r_out, rest) = out[r * line..(r + 1) * line].split_at_mut(self.window.w);
                    let (g_out, b_out) = rest.split_at_mut(self.window.w);
                    for (i, px) in row.chunks_exact(RGBX).enumerate() {
                        r_out[i] = px[0];
                        g_out[i] = px[1];
                        b_out[i] = px[2];
                    }
                }
            }
        }
        self.received += count;
    }

    /// [`WindowResize::push_rgbx`] for packed RGB rows (`stride` bytes apart) starting at column 0.
    pub fn push_rgb(&mut self, y: usize, n: usize, data: &[u8], stride: usize) {
        const BLOCK: usize = 16;
        let (c0, c1) = (self.cols.start, self.cols.end);
        let rgbx_stride = (c1 - c0 + 1) * RGBX;
        let mut block = std::mem::take(&mut self.buffers.rgbx);
        block.clear();
        block.resize(BLOCK * rgbx_stride, 0);
        let mut r = 0;
        while r < n {
            let k = BLOCK.min(n - r);
            for i in 0..k {
                let src = &data[(r + i) * stride + c0 * 3..(r + i) * stride + c1 * 3];
                let dst = &mut block[i * rgbx_stride..i * rgbx_stride + (c1 - c0) * RGBX];
                for (d, s) in dst.chunks_exact_mut(RGBX).zip(src.chunks_exact(3)) {
                    d[..3].copy_from_slice(s);
                }
            }
            self.push_rgbx(y + r, k, &block[..k * rgbx_stride], rgbx_stride, c0);
            r += k;
        }
        self.buffers.rgbx = block;
    }

    /// The vertical pass: hands `emit` each row of the window, top to bottom, as planar 8-bit values (`w` red,
    /// `w` green, `w` blue). Every row read must have been pushed.
    pub fn finish(self, mut emit: impl FnMut(usize, &[u8])) {
        assert!(self.complete(), "{} of {} source rows pushed", self.received, self.rows.len());
        let line = 3 * self.window.w;
        let WindowResize { window, vertical, rows, buffers, .. } = self;
        let Some(c) = vertical else {
            for oy in 0..window.h {
                emit(oy, &buffers.tmp[oy * line..(oy + 1) * line]);
            }
            return;
        };
        buffers.line.resize(line, 0);
        for oy in 0..window.h {
            let (ymin, count) = c.bounds[oy];
            let taps = &buffers.tmp[(ymin - rows.start) * line..(ymin - rows.start + count) * line];
            vertical_row(taps, line, &c.weights[oy * c.ksize..oy * c.ksize + count], &mut buffers.line);
            emit(oy, &buffers.line);
        }
    }
}

/// `clip8` without branches, for vectorised loops: same results.
#[inline(always)]
fn clip8_lane(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

#[cfg(test)]
thread_local! {
    /// Tests: run the portable kernels even where AVX2 is there, to check both against the reference.
    static PORTABLE_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// True where the AVX2 kernels run.
#[cfg(target_arch = "x86_64")]
fn use_avx2() -> bool {
    #[cfg(test)]
    if PORTABLE_ONLY.with(|p| p.get()) {
        return false;
    }
    std::is_x86_feature_detected!("avx2")
}

/// The horizontal pass over a block of RGBX rows into planar rows of `w` values per channel.
fn horizontal(taps: &HorizontalTaps, data: &[u8], stride: usize, x0: usize, out: &mut [u8], w: usize) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU has AVX2 (checked just above).
        unsafe { horizontal_avx2(taps, data, stride, x0, out, w) };
        return;
    }
    horizontal_portable(taps, data, stride, x0, out, w);
}

/// [`horizontal_portable`] with AVX2: per output pixel, two source rows at a time (sharing the weight loads),
/// each step multiplying two RGBX pixels widened to 8 lanes by the pair's 8 weight lanes.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn horizontal_avx2(taps: &HorizontalTaps, data: &[u8], stride: usize, x0: usize, out: &mut [u8], w: usize) {
    use std::arch::x86_64::*;
    let line = 3 * w;
    let rows = out.len() / line;
    if rows == 0 {
        return;
    }
    assert!(out.len() == rows * line && taps.first.len() >= w && taps.pairs.len() >= w);
    let half = _mm_set1_epi32(1 << (PRECISION_BITS - 1));
    // Sums lanes 0-3 and 4-7, rounds, shifts and saturates to 8 bits: R, G, B in the low three bytes.
    let finish = |acc: __m256i| -> u32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256::<1>(acc));
        let s = _mm_srai_epi32::<PRECISION_BITS_I32>(_mm_add_epi32(s, half));
        let s = _mm_packus_epi16(_mm_packs_epi32(s, s), _mm_setzero_si128());
        _mm_cvtsi128_si32(s) as u32
    };
    for ox in 0..w {
        let start = (taps.first[ox] - x0) * RGBX;
        let pairs = taps.pairs[ox];
        let lanes = &taps.lanes[ox * taps.stride..ox * taps.stride + pairs * 8];
        // Every load below stays inside `data` and `lanes`.
        assert!(start + pairs * 8 + (rows - 1) * stride <= data.len());
        let k = lanes.as_ptr() as *const __m256i;
        let mut r = 0;
        // Four rows at a time: four independent sums per weight load.
        while r + 4 <= rows {
            let p0 = data.as_ptr().add(r * stride + start);
            let (p1, p2, p3) = (p0.add(stride), p0.add(2 * stride), p0.add(3 * stride));
            let mut acc = [_mm256_setzero_si256(); 4];
            for i in 0..pairs {
                let kv = _mm256_loadu_si256(k.add(i));
                for (a, p) in acc.iter_mut().zip([p0, p1, p2, p3]) {
                    let x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(i * 8) as *const __m128i));
                    *a = _mm256_add_epi32(*a, _mm256_mullo_epi32(x, kv));
                }
            }
            for (j, a) in acc.into_iter().enumerate() {
                let v = finish(a).to_le_bytes();
                let o = &mut out[(r + j) * line..(r + j + 1) * line];
                o[ox] = v[0];
                o[w + ox] = v[1];
                o[2 * w + ox] = v[2];
            }
            r += 4;
        }
        while r < rows {
            let two = r + 1 < rows;
            let p0 = data.as_ptr().add(r * stride + start);
            let p1 = if two { p0.add(stride) } else { p0 };
            let (mut a0, mut a1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for i in 0..pairs {
                let kv = _mm256_loadu_si256(k.add(i));
                let x0v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p0.add(i * 8) as *const __m128i));
                let x1v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p1.add(i * 8) as *const __m128i));
                a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(x0v, kv));
                a1 = _mm256_add_epi32(a1, _mm256_mullo_epi32(x1v, kv));
            }
            let v = finish(a0).to_le_bytes();
            let o = &mut out[r * line..(r + 1) * line];
            o[ox] = v[0];
            o[w + ox] = v[1];
            o[2 * w + ox] = v[2];
            if two {
                let v = finish(a1).to_le_bytes();
                let o = &mut out[(r + 1) * line..(r + 2) * line];
                o[ox] = v[0];
                o[w + ox] = v[1];
                o[2 * w + ox] = v[2];
            }
            r += 2;
        }
    }
}

/// Written so the compiler vectorises it: per output pixel and row, two RGBX source pixels (8 bytes) times 8
/// weight lanes per step, summed in 8 integer lanes; lanes 0-2 and 4-6 hold the channels' partial sums.
#[inline(always)]
fn horizontal_portable(taps: &HorizontalTaps, data: &[u8], stride: usize, x0: usize, out: &mut [u8], w: usize) {
    let half = 1i32 << (PRECISION_BITS - 1);
    let line = 3 * w;
    let rows = out.len() / line;
    for ox in 0..w {
        let start = (taps.first[ox] - x0) * RGBX;
        let len = taps.pairs[ox] * 8;
        let lanes = &taps.lanes[ox * taps.stride..ox * taps.stride + len];
        for r in 0..rows {
            let px = &data[r * stride + start..r * stride + start + len];
            let mut acc = [0i32; 8];
            for (p, k) in px.chunks_exact(8).zip(lanes.chunks_exact(8)) {
                for i in 0..8 {
                    acc[i] = acc[i].wrapping_add((p[i] as i32).wrapping_mul(k[i]));
                }
            }
            let o = &mut out[r * line..(r + 1) * line];
            for c in 0..3 {
                o[c * w + ox] = clip8_lane(half.wrapping_add(acc[c]).wrapping_add(acc[c + 4]));
            }
        }
    }
}

/// One output row of the vertical pass: `taps` holds `weights.len()` consecutive rows of `line` values.
fn vertical_row(taps: &[u8], line: usize, weights: &[i32], out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU has AVX2 (checked just above).
        unsafe { vertical_row_avx2(taps, line, weights, out) };
        return;
    }
    vertical_row_portable(taps, line, weights, out);
}

/// [`vertical_row_portable`] with AVX2: 16 output values at a time, summed over the taps in registers.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn vertical_row_avx2(taps: &[u8], line: usize, weights: &[i32], out: &mut [u8]) {
    use std::arch::x86_64::*;
    const LANES: usize = 16;
    assert!(taps.len() >= weights.len() * line && out.len() >= line);
    let half = _mm256_set1_epi32(1 << (PRECISION_BITS - 1));
    let pack = |acc: __m256i| -> __m128i {
        let s = _mm256_srai_epi32::<PRECISION_BITS_I32>(acc);
        let s = _mm_packs_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        _mm_packus_epi16(s, s)
    };
    let full = line / LANES * LANES;
    let base = taps.as_ptr();
    for j in (0..full).step_by(LANES) {
        let (mut a0, mut a1) = (half, half);
        for (t, &k) in weights.iter().enumerate() {
            let v = _mm_loadu_si128(base.add(t * line + j) as *const __m128i);
            let kv = _mm256_set1_epi32(k);
            a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(v), kv));
            a1 = _mm256_add_epi32(a1, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(v)), kv));
        }
        let dst = out.as_mut_ptr().add(j);
        _mm_storel_epi64(dst as *mut __m128i, pack(a0));
        _mm_storel_epi64(dst.add(8) as *mut __m128i, pack(a1));
    }
    for j in full..line {
        let mut acc = 1i32 << (PRECISION_BITS - 1);
        for (t, &k) in weights.iter().enumerate() {
            acc = acc.wrapping_add((taps[t * line + j] as i32).wrapping_mul(k));
        }
        out[j] = clip8_lane(acc);
    }
}

/// Written so the compiler vectorises it: 16 output values at a time, summed over the taps in registers.
#[inline(always)]
fn vertical_row_portable(taps: &[u8], line: usize, weights: &[i32], out: &mut [u8]) {
    const LANES: usize = 16;
    let half = 1i32 << (PRECISION_BITS - 1);
    let full = line / LANES * LANES;
    for j in (0..full).step_by(LANES) {
        let mut acc = [half; LANES];
        for (t, &k) in weights.iter().enumerate() {
            let row = &taps[t * line + j..t * line + j + LANES];
            for i in 0..LANES {
                acc[i] = acc[i].wrapping_add((row[i] as i32).wrapping_mul(k));
            }
        }
        for i in 0..LANES {
            out[j + i] = clip8_lane(acc[i]);
        }
    }
    for j in full..line {
        let mut acc = half;
        for (t, &k) in weights.iter().enumerate() {
            acc = acc.wrapping_add((taps[t * line + j] as i32).wrapping_mul(k));
        }
        out[j] = clip8_lane(acc);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn identity_size_is_a_copy() {
        let src: Vec<u8> = (0..4 * 3 * 3).map(|i| i as u8).collect();
        let out = resize_rgb_window(&src, 4, 3, 4, 3, Window { x0: 0, y0: 0, w: 4, h: 3 });
        assert_eq!(out, src);
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![77u8; 50 * 31 * 3];
        for (dw, dh) in [(224, 137), (20, 12), (50, 200)] {
            let out = resize_rgb_window(&src, 50, 31, dw, dh, Window { x0: 0, y0: 0, w: dw, h: dh });
            assert!(out.iter().all(|&v| v == 77), "{dw}x{dh}");
        }
    }

    #[test]
    fn window_equals_crop_of_full_resize() {
        let (sw, sh) = (97, 61);
        let src: Vec<u8> = (0..sw * sh * 3).map(|i| ((i * 7919) % 251) as u8).collect();
        let (dw, dh) = (150, 40);
        let full = resize_rgb_window(&src, sw, sh, dw, dh, Window { x0: 0, y0: 0, w: dw, h: dh });
        let win = Window { x0: 13, y0: 5, w: 100, h: 30 };
        let part = resize_rgb_window(&src, sw, sh, dw, dh, win);
        for y in 0..win.h {
            let a = &full[((win.y0 + y) * dw + win.x0) * 3..((win.y0 + y) * dw + win.x0 + win.w) * 3];
            assert_eq!(a, &part[y * win.w * 3..(y + 1) * win.w * 3], "row {y}");
        }
    }

    /// A small deterministic generator (xorshift64*), for the property tests.
    pub(crate) struct Rng(pub u64);

    impl Rng {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        /// Uniform in `lo..=hi`.
        pub fn range(&mut self, lo: usize, hi: usize) -> usize {
            lo + (self.next() % (hi - lo + 1) as u64) as usize
        }
    }

    /// Content that exercises the clipping: noise, hard edges, flat areas, full-range extremes.
    fn test_image(rng: &mut Rng, w: usize, h: usize) -> Vec<u8> {
        let kind = rng.range(0, 3);
        let mut v = vec![0u8; w * h * 3];
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    v[(y * w + x) * 3 + c] = match kind {
                        0 => rng.next() as u8,
                        1 => {
                            if (x / 3 + y / 2 + c) % 2 == 0 {
                                0
                            } else {
                                255
                            }
                        }
                        2 => ((x * 255) / w.max(1)) as u8 ^ ((y * 7) as u8),
                        _ => {
                            if rng.range(0, 9) == 0 {
                                rng.next() as u8
                            } else {
                                (x * 3 + y * 5 + c * 80) as u8
                            }
                        }
                    };
                }
            }
        }
        v
    }

    /// Runs the planned resize, feeding the rows it reads as RGBX blocks of random heights, cropped on the left at
    /// a random column before the first one read, with junk in the fourth bytes and after the columns read.
    fn planned(rng: &mut Rng, src: &[u8], sw: usize, sh: usize, dw: usize, dh: usize, window: Window) -> Vec<u8> {
        let mut buffers = ResizeBuffers::default();
        let mut r = WindowResize::new(sw, sh, dw, dh, window, &mut buffers);
        let (rows, cols) = (r.rows(), r.cols());
        assert!(rows.end <= sh && cols.end <= sw && !rows.is_empty() && !cols.is_empty());
        let x0 = rng.range(0, cols.start);
        let width = cols.end + 1 - x0 + rng.range(0, 3);
        let stride = width * RGBX + rng.range(0, 2) * 4;
        let mut y = rows.start;
        while y < rows.end {
            let n = rng.range(1, 17).min(rows.end - y);
            let mut block = vec![0u8; n * stride];
            for (i, b) in block.iter_mut().enumerate() {
                *b = (i * 31 + 7) as u8;
            }
            for k in 0..n {
                for x in x0..(x0 + width).min(sw) {
                    let at = k * stride + (x - x0) * RGBX;
                    block[at..at + 3].copy_from_slice(&src[((y + k) * sw + x) * 3..((y + k) * sw + x) * 3 + 3]);
                }
            }
            r.push_rgbx(y, n, &block, stride, x0);
            y += n;
        }
        assert!(r.complete());
        let mut out = vec![0u8; window.w * window.h * 3];
        r.finish(|oy, line| {
            for x in 0..window.w {
                for c in 0..3 {
                    out[(oy * window.w + x) * 3 + c] = line[c * window.w + x];
                }
            }
        });
        out
    }

    fn check_planned_equals_reference(portable: bool) {
        PORTABLE_ONLY.with(|p| p.set(portable));
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ portable as u64);
        for case in 0..300 {
            let (sw, sh) = (rng.range(1, 400), rng.range(1, 300));
            // Downscales, upscales, one axis unchanged, and the model's shortest-side-224 shapes.
            let (dw, dh) = match case % 4 {
                0 => (rng.range(1, 300), rng.range(1, 300)),
                1 => (sw, rng.range(1, 250)),
                2 => (rng.range(1, 250), sh),
                _ => {
                    let (w, h) = crate::inputs::image::resized_dims(sw as u32, sh as u32, 64).unwrap();
                    (w as usize, h as usize)
                }
            };
            let (ww, wh) = (rng.range(1, dw), rng.range(1, dh));
            let window = Window { x0: rng.range(0, dw - ww), y0: rng.range(0, dh - wh), w: ww, h: wh };
            let src = test_image(&mut rng, sw, sh);
            let want = resize_rgb_window(&src, sw, sh, dw, dh, window);
            let got = planned(&mut rng, &src, sw, sh, dw, dh, window);
            assert!(got == want, "case {case}: {sw}x{sh} -> {dw}x{dh}, {window:?} (portable {portable})");
        }
        PORTABLE_ONLY.with(|p| p.set(false));
    }

    #[test]
    fn planned_resize_equals_the_reference() {
        check_planned_equals_reference(false);
    }

    #[test]
    fn portable_kernels_equal_the_reference() {
        check_planned_equals_reference(true);
    }

    #[test]
    fn packed_rgb_rows_equal_rgbx_rows() {
        let mut rng = Rng(7);
        for _ in 0..50 {
            let (sw, sh) = (rng.range(1, 300), rng.range(1, 300));
            let (dw, dh) = (rng.range(1, 200), rng.range(1, 200));
            let window = Window { x0: 0, y0: 0, w: dw, h: dh };
            let src = test_image(&mut rng, sw, sh);
            let mut buffers = ResizeBuffers::default();
            let mut r = WindowResize::new(sw, sh, dw, dh, window, &mut buffers);
            let rows = r.rows();
            r.push_rgb(rows.start, rows.len(), &src[rows.start * sw * 3..rows.end * sw * 3], sw * 3);
            let mut got = vec![0u8; dw * dh * 3];
            r.finish(|oy, line| {
                for x in 0..dw {
                    for c in 0..3 {
                        got[(oy * dw + x) * 3 + c] = line[c * dw + x];
                    }
                }
            });
            assert_eq!(got, resize_rgb_window(&src, sw, sh, dw, dh, window), "{sw}x{sh} -> {dw}x{dh}");
        }
    }

    #[test]
    fn rows_outside_the_region_are_ignored_and_missing_rows_are_noticed() {
        let src = vec![200u8; 40 * 400 * 3];
        let mut buffers = ResizeBuffers::default();
        let window = Window { x0: 0, y0: 40, w: 20, h: 20 };
        let mut r = WindowResize::new(40, 400, 20, 200, window, &mut buffers);
        let rows = r.rows();
        assert!(rows.start > 0 && rows.end < 400, "{rows:?}");
        r.push_rgb(0, rows.start, &src[..rows.start * 120], 120);
        assert!(!r.complete());
        r.push_rgb(rows.start, rows.len() - 1, &src[rows.start * 120..(rows.end - 1) * 120], 120);
        assert!(!r.complete());
        r.push_rgb(rows.end - 1, 400 - rows.end + 1, &src[(rows.end - 1) * 120..], 120);
        assert!(r.complete());
        r.finish(|_, line| assert!(line.iter().all(|&v| v == 200)));
    }
}
