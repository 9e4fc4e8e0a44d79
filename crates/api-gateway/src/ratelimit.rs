//! Per-user rate limits: two token buckets per user (reads, changes), in memory. Each
//! gateway replica limits on its own; the limits are a guard against runaway clients, not
//! a quota system.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::RateLimitConfig;
use crate::error::ApiError;

/// Buckets idle this long are full again and are dropped, so the map stays small.
const IDLE_EVICTION: Duration = Duration::from_secs(600);
/// Entries scanned for eviction once the map grows past this.
const EVICTION_THRESHOLD: usize = 10_000;

/// Which bucket a request draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    Read,
    Write,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

#[derive(Debug)]
pub struct RateLimiter {
    config: RateLimitConfig,
    buckets: Mutex<HashMap<(String, Class), Bucket>>,
}

impl RateLimiter {
    pub fn new(config: RateLimitConfig) -> Self {
        Self {
            config,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn shape(&self, class: Class) -> (f64, f64) {
        match class {
            Class::Read => (
                self.config.read_per_second,
                f64::from(self.config.read_burst),
            ),
            Class::Write => (
                self.config.write_per_second,
                f64::from(self.config.write_burst),
            ),
        }
    }

    /// Takes one token from `user`'s bucket, or says how long until one is available.
    pub fn admit(&self, user: &str, class: Class) -> Result<(), ApiError> {
        if !self.config.enabled {
            return Ok(());
        }
        let (rate, burst) = self.shape(class);
        let now = Instant::now();
        // A poisoned lock only means another request panicked mid-update; the map of
        // buckets is still usable.
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > EVICTION_THRESHOLD {
            buckets.retain(|_, b| now.duration_since(b.updated) < IDLE_EVICTION);
        }
        let bucket = buckets.entry((user.to_owned(), class)).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        let elapsed = now.duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / rate;
            Err(ApiError::RateLimited {
                retry_after: Duration::from_secs_f64(wait.ceil().max(1.0)),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_admitted_then_refused_per_user_and_class() {
        let limiter = RateLimiter::new(RateLimitConfig {
            enabled: true,
            read_per_second: 0.001,
            read_burst: 2,
            write_per_second: 0.001,
            write_burst: 1,
        });
        assert!(limiter.admit("a", Class::Read).is_ok());
        assert!(limiter.admit("a", Class::Read).is_ok());
        let err = limiter.admit("a", Class::Read).unwrap_err();
        assert!(
            matches!(err, ApiError::RateLimited { retry_after } if retry_after >= Duration::from_secs(1))
        );
        assert!(limiter.admit("a", Class::Write).is_ok(), "separate bucket");
        assert!(limiter.admit("b", Class::Read).is_ok(), "separate user");
    }
}
