//! When to try a failed delivery again: the configured schedule with ±20 % jitter,
//! `Retry-After` honoured but clamped, and a maximum age after which the job is parked.

use rand::Rng;
use std::time::Duration;

/// Retry maths, built from `[worker]` settings.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub schedule: Vec<Duration>,
    pub max_age: Duration,
    pub retry_after_max: Duration,
}

impl RetryPolicy {
    /// The delay before the next attempt, or `None` when the job should be parked.
    /// `attempts` counts the attempts made so far, the failed one included.
    pub fn next_delay(
        &self,
        attempts: u32,
        age: Duration,
        retry_after: Option<Duration>,
    ) -> Option<Duration> {
        let base = *self.schedule.get(attempts.checked_sub(1)? as usize)?;
        let jitter = rand::thread_rng().gen_range(0.8..=1.2);
        let mut delay = base.mul_f64(jitter);
        if let Some(asked) = retry_after {
            delay = delay.max(asked.min(self.retry_after_max));
        }
        (age + delay <= self.max_age).then_some(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            schedule: vec![Duration::from_secs(5), Duration::from_secs(30)],
            max_age: Duration::from_secs(3600),
            retry_after_max: Duration::from_secs(600),
        }
    }

    #[test]
    fn delays_follow_the_schedule_within_jitter() {
        let p = policy();
        for _ in 0..100 {
            let d = p.next_delay(1, Duration::ZERO, None).unwrap();
            assert!(
                d >= Duration::from_secs(4) && d <= Duration::from_secs(6),
                "{d:?}"
            );
            let d = p.next_delay(2, Duration::ZERO, None).unwrap();
            assert!(
                d >= Duration::from_secs(24) && d <= Duration::from_secs(36),
                "{d:?}"
            );
        }
    }

    #[test]
    fn the_schedule_runs_out() {
        assert_eq!(policy().next_delay(3, Duration::ZERO, None), None);
        assert_eq!(policy().next_delay(0, Duration::ZERO, None), None);
    }

    #[test]
    fn retry_after_is_honoured_but_clamped() {
        let p = policy();
        let d = p
            .next_delay(1, Duration::ZERO, Some(Duration::from_secs(60)))
            .unwrap();
        assert_eq!(d, Duration::from_secs(60));
        let d = p
            .next_delay(1, Duration::ZERO, Some(Duration::from_secs(100_000)))
            .unwrap();
        assert_eq!(d, Duration::from_secs(600));
    }

    #[test]
    fn an_old_job_is_parked_whatever_its_attempts() {
        assert_eq!(
            policy().next_delay(1, Duration::from_secs(3599), None),
            None
        );
    }
}
