//! Any bytes through decode + CLIP preprocessing, in both modes: an error or a 3x224x224 tensor of finite values,
//! never a panic, a hang or an allocation past the pixel limit.
#![no_main]

use clipserve::inputs::image::{never_stop, ImagePreprocessor, PreprocessMode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let pre = ImagePreprocessor {
        size: 224,
        mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
        std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
        max_bytes: 1 << 20,
        max_pixels: 4_000_000,
        max_jpeg_scans: 100,
    };
    let exact = pre.preprocess(data);
    let fast = pre.preprocess_mode_until(data, PreprocessMode::Fast, &never_stop);
    for t in [&exact, &fast].into_iter().flatten() {
        assert_eq!(t.len(), 3 * 224 * 224);
        assert!(t.iter().all(|x| x.is_finite()));
    }
});
