//! A call's timings as response headers, named as text-embeddings-inference names them: `x-total-time`,
//! `x-queue-time`, `x-preprocess-time`, `x-inference-time` (and `x-cache-hits`). Values are milliseconds with three
//! decimals (microsecond resolution). For a call of several items the stage times are the mean over its items, as
//! TEI reports batches; `x-total-time` is the call's own time from its arrival to its answer.

use std::time::{Duration, Instant};

use crate::engine::ItemOutput;

/// The timings of one call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// From the call's arrival to now.
    pub total: Duration,
    /// Means over the items.
    pub queue: Duration,
    pub preprocess: Duration,
    pub inference: Duration,
    /// Items whose embeddings all came from the content cache.
    pub cache_hits: usize,
}

impl Summary {
    /// The timings of a call that arrived at `arrival` and answered `outputs`.
    pub fn of<'a>(outputs: impl IntoIterator<Item = &'a ItemOutput>, arrival: Instant) -> Summary {
        let (mut n, mut queue, mut preprocess, mut inference, mut cache_hits) =
            (0u32, Duration::ZERO, Duration::ZERO, Duration::ZERO, 0);
        for o in outputs {
            n += 1;
            queue += o.timing.queue;
            preprocess += o.timing.preprocess;
            inference += o.timing.inference;
            cache_hits += o.timing.cached as usize;
        }
        let mean = |d: Duration| if n == 0 { Duration::ZERO } else { d / n };
        Summary {
            total: arrival.elapsed(),
            queue: mean(queue),
            preprocess: mean(preprocess),
            inference: mean(inference),
            cache_hits,
        }
    }

    /// The response headers: names and values.
    pub fn headers(&self) -> [(&'static str, String); 5] {
        let ms = |d: Duration| format!("{:.3}", d.as_secs_f64() * 1e3);
        [
            ("x-total-time", ms(self.total)),
            ("x-queue-time", ms(self.queue)),
            ("x-preprocess-time", ms(self.preprocess)),
            ("x-inference-time", ms(self.inference)),
            ("x-cache-hits", self.cache_hits.to_string()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ItemTiming;

    #[test]
    fn stage_times_are_means_over_the_items() {
        let item = |q: u64, p: u64, i: u64, cached: bool| ItemOutput {
            timing: ItemTiming {
                queue: Duration::from_micros(q),
                preprocess: Duration::from_micros(p),
                inference: Duration::from_micros(i),
                cached,
            },
            ..Default::default()
        };
        let items = [item(1000, 300, 2000, false), item(3000, 100, 0, true)];
        let s = Summary::of(&items, Instant::now() - Duration::from_millis(7));
        assert_eq!(
            (s.queue, s.preprocess, s.inference),
            (Duration::from_millis(2), Duration::from_micros(200), Duration::from_millis(1))
        );
        assert_eq!(s.cache_hits, 1);
        let h = s.headers();
        assert_eq!(h[1], ("x-queue-time", "2.000".to_string()));
        assert_eq!(h[2], ("x-preprocess-time", "0.200".to_string()));
        assert_eq!(h[4], ("x-cache-hits", "1".to_string()));
        assert!(h[0].1.parse::<f64>().unwrap() >= 7.0);
        assert_eq!(Summary::of(&[], Instant::now()).queue, Duration::ZERO);
    }
}
