//! Bicubic resampling that reproduces Pillow's `Image.resize(..., BICUBIC)` bit for bit on 8-bit RGB.
//!
//! Written by hand rather than taken from an image-resizing crate because CLIP parity needs Pillow's exact
//! arithmetic: its coefficient rounding (22-bit fixed point), its pass order (horizontal first, then vertical)
//! and its clipping of the intermediate image to 8 bits. A general resizer that runs the passes in the other order
//! differs by up to tens of levels on high-contrast content (dithered palettes), where the bicubic overshoot is
//! clipped at a different stage. Only the output pixels inside the crop window are computed: each output pixel
//! depends on the source alone, so the result equals resizing everything and cropping afterwards.

const PRECISION_BITS: u32 = 32 - 8 - 2;
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

#[cfg(test)]
mod tests {
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
}
