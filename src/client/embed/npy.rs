//! The `.npy` format (version 1.0): a magic string, a header that is a Python dict literal padded to a multiple
//! of 64 bytes, then the little-endian rows.

use half::slice::HalfFloatSliceExt;

use super::Dtype;

/// Bytes per element.
pub(super) fn element_size(dtype: Dtype) -> usize {
    match dtype {
        Dtype::Float16 => 2,
        Dtype::Float32 => 4,
    }
}

/// The header of a C-order `rows` x `dim` array.
pub(super) fn header(dtype: Dtype, rows: u64, dim: usize) -> Vec<u8> {
    let descr = match dtype {
        Dtype::Float16 => "<f2",
        Dtype::Float32 => "<f4",
    };
    let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({rows}, {dim}), }}");
    let mut h = dict.into_bytes();
    let total = 10 + h.len() + 1;
    h.extend(std::iter::repeat_n(b' ', (64 - total % 64) % 64));
    h.push(b'\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((h.len() as u16).to_le_bytes());
    out.extend(h);
    out
}

/// Appends `values` as little-endian elements of `dtype`.
pub(super) fn encode(values: &[f32], dtype: Dtype, out: &mut Vec<u8>) {
    match dtype {
        Dtype::Float32 => {
            out.reserve(values.len() * 4);
            for x in values {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        Dtype::Float16 => {
            let mut halves = vec![half::f16::ZERO; values.len()];
            halves.convert_from_f32_slice(values);
            out.reserve(values.len() * 2);
            for x in halves {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_padded_to_64_bytes_and_values_are_little_endian() {
        for (dtype, rows) in [(Dtype::Float16, 0u64), (Dtype::Float32, 123_456_789)] {
            let h = header(dtype, rows, 512);
            assert_eq!(h.len() % 64, 0);
            assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
            assert_eq!(u16::from_le_bytes([h[8], h[9]]) as usize, h.len() - 10);
            let text = std::str::from_utf8(&h[10..]).unwrap();
            assert!(text.contains(&format!("'shape': ({rows}, 512)")), "{text}");
            assert!(text.ends_with('\n'));
        }
        let mut out = Vec::new();
        encode(&[1.0, -2.5], Dtype::Float16, &mut out);
        assert_eq!(out, [0x00, 0x3c, 0x00, 0xc1]);
        out.clear();
        encode(&[1.0], Dtype::Float32, &mut out);
        assert_eq!(out, 1.0f32.to_le_bytes());
    }
}
