//! A call's timings as response headers, named as text-embeddings-inference names them: `x-total-time`,
//! `x-queue-time`, `x-preprocess-time`, `x-inference-time` (and `x-cache-hits`). Values are milliseconds with three
//! decimals (microsecond resolution). For a call of several items the stage times are the mean over its items, as
//! TEI reports batches; `x-total-time` is the call's own time from its arrival to its answer.

use std::time::{Duration, Instant};

use crate::batching::ItemTiming;

/// The stages of a call's items: means over the items.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stages {
    pub queue: Duration,
    pub preprocess: Duration,
    pub inference: Duration,
    /// Items whose embeddings all came from the content cache.
    pub cache_hits: usize,
}

impl Stages {
    /// The means of these items' timings.
    pub fn of<'a>(timings: impl IntoIterator<Item = &'a ItemTiming>) -> Stages {
        let (mut n, mut sum) = (0u32, Stages::default());
        for t in timings {
            n += 1;
            sum.queue += t.queue;
            sum.preprocess += t.preprocess;
            sum.inference += t.inference;
            sum.cache_hits += t.cached as usize;
        }
        let mean = |d: Duration| if n == 0 { Duration::ZERO } else { d / n };
        Stages { queue: mean(sum.queue), preprocess: mean(sum.preprocess), inference: mean(sum.inference), ..sum }
    }
}

/// Milliseconds with three decimals.
fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// The headers of a call that arrived at `arrival` (its total time is counted until now), with its items' stages
/// when they are known.
pub fn headers(arrival: Instant, stages: Option<&Stages>) -> Vec<(&'static str, String)> {
    let mut headers = vec![("x-total-time", ms(arrival.elapsed()))];
    if let Some(s) = stages {
        headers.extend([
            ("x-queue-time", ms(s.queue)),
            ("x-preprocess-time", ms(s.preprocess)),
            ("x-inference-time", ms(s.inference)),
            ("x-cache-hits", s.cache_hits.to_string()),
        ]);
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_times_are_means_over_the_items() {
        let item = |q: u64, p: u64, i: u64, cached: bool| ItemTiming {
            queue: Duration::from_micros(q),
            preprocess: Duration::from_micros(p),
            inference: Duration::from_micros(i),
            cached,
        };
        let items = [item(1000, 300, 2000, false), item(3000, 100, 0, true)];
        let s = Stages::of(&items);
        assert_eq!(
            (s.queue, s.preprocess, s.inference),
            (Duration::from_millis(2), Duration::from_micros(200), Duration::from_millis(1))
        );
        assert_eq!(s.cache_hits, 1);
        let h = headers(Instant::now() - Duration::from_millis(7), Some(&s));
        assert_eq!(h[1], ("x-queue-time", "2.000".to_string()));
        assert_eq!(h[2], ("x-preprocess-time", "0.200".to_string()));
        assert_eq!(h[4], ("x-cache-hits", "1".to_string()));
        assert!(h[0].1.parse::<f64>().unwrap() >= 7.0);
        assert_eq!(Stages::of(&[]).queue, Duration::ZERO);
        let total_only = headers(Instant::now(), None);
        assert_eq!(total_only.len(), 1);
        assert_eq!(total_only[0].0, "x-total-time");
    }
}
