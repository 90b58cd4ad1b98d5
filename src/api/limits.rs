//! Request rates (`api.rate_limits`): token buckets (governor) per
//! account on authenticated routes, per client (an address grouped by
//! `api.client_prefix_*`) on the others and on authentication attempts;
//! and the failed-login throttle per account.
//!
//! The buckets live in each node's memory. So that an account gets its
//! documented rate across a cluster rather than that many times it, each
//! node enforces its share of the per-account budget: the rate and burst
//! divided by the number of live nodes (`set_nodes`, from the cluster's
//! heartbeats). A balancer that spreads an account's requests evenly
//! gives it the whole rate; one that pins it to a node, that node's share.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use uuid::Uuid;

use super::store::throttle::Seen;
use crate::config::RateLimitsConfig;
use crate::edge::ClientPrefixes;

/// Past this many tracked keys, idle ones are swept.
const SWEEP_AT: usize = 10_000;
/// The wait after the first failed login past the free ones; it doubles.
const FIRST_DELAY: Duration = Duration::from_secs(1);

/// Which bucket a request was counted in, for the answer's wording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    /// `api.rate_limits.auth_per_minute`.
    Authentication,
    /// `api.rate_limits.account_per_second`.
    Account,
    /// `api.rate_limits.address_per_second`.
    Address,
    /// The failed-login throttle of one account.
    Login,
}

/// Over a limit: which, and when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub bucket: Bucket,
    pub retry_after: Duration,
}

struct Keyed<K: Hash + Eq + Clone>(DefaultKeyedRateLimiter<K>);

impl<K: Hash + Eq + Clone> Keyed<K> {
    fn new(quota: Quota) -> Self {
        Keyed(RateLimiter::keyed(quota))
    }

    fn check(&self, key: &K, bucket: Bucket) -> Result<(), Limited> {
        if self.0.len() >= SWEEP_AT {
            self.0.retain_recent();
        }
        self.0.check_key(key).map_err(|not_until| Limited {
            bucket,
            retry_after: not_until.wait_time_from(DefaultClock::default().now()),
        })
    }
}

fn at_least_one(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

struct Buckets {
    authentication: Keyed<IpAddr>,
    account: Keyed<Uuid>,
    address: Keyed<IpAddr>,
    logins: LoginRule,
}

impl Buckets {
    fn new(config: &RateLimitsConfig, nodes: u32) -> Buckets {
        let per_minute = at_least_one(config.auth_per_minute);
        Buckets {
            authentication: Keyed::new(Quota::per_minute(per_minute).allow_burst(per_minute)),
            account: Keyed::new(account_share(config, nodes)),
            address: Keyed::new(
                Quota::per_second(at_least_one(config.address_per_second))
                    .allow_burst(at_least_one(config.address_burst)),
            ),
            logins: LoginRule::new(config),
        }
    }
}

/// One node's share of the per-account budget when `nodes` are live:
/// `account_per_second / nodes` a second (as a replenish interval, so
/// shares below one a second stay exact), the burst divided likewise.
fn account_share(config: &RateLimitsConfig, nodes: u32) -> Quota {
    let nodes = nodes.max(1);
    let per_second = config.account_per_second.max(1);
    let interval = Duration::from_secs_f64(f64::from(nodes) / f64::from(per_second));
    let burst = at_least_one(config.account_burst.div_ceil(nodes));
    Quota::with_period(interval)
        .expect("a positive interval")
        .allow_burst(burst)
}

/// The settings and cluster size the buckets were made for.
struct Made {
    config: RateLimitsConfig,
    nodes: u32,
}

/// Every rate limit of the API; replaced whole on SIGHUP and when the
/// number of live nodes changes (counts restart).
pub struct Limits {
    current: RwLock<Arc<Buckets>>,
    made: Mutex<Made>,
    prefixes: ClientPrefixes,
}

impl Limits {
    pub fn new(config: &RateLimitsConfig, prefixes: ClientPrefixes) -> Limits {
        Limits {
            current: RwLock::new(Arc::new(Buckets::new(config, 1))),
            made: Mutex::new(Made {
                config: config.clone(),
                nodes: 1,
            }),
            prefixes,
        }
    }

    fn remake(&self, change: impl FnOnce(&mut Made)) {
        let mut made = self.made.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut made);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(Buckets::new(&made.config, made.nodes));
    }

    pub fn reconfigure(&self, config: &RateLimitsConfig) {
        self.remake(|made| made.config = config.clone());
    }

    /// The number of live nodes sharing the per-account budget; the
    /// buckets are made anew only when it changes.
    pub fn set_nodes(&self, nodes: u32) {
        let nodes = nodes.max(1);
        if self.made.lock().unwrap_or_else(|e| e.into_inner()).nodes != nodes {
            self.remake(|made| made.nodes = nodes);
        }
    }

    fn buckets(&self) -> Arc<Buckets> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// One authentication attempt (login, register, password change,
    /// erasure) from `addr`.
    pub fn authentication(&self, addr: IpAddr) -> Result<(), Limited> {
        self.buckets()
            .authentication
            .check(&self.prefixes.client(addr), Bucket::Authentication)
    }

    /// One request of an authenticated account.
    pub fn account(&self, user: Uuid) -> Result<(), Limited> {
        self.buckets().account.check(&user, Bucket::Account)
    }

    /// One unauthenticated request (or one with a rejected token) from
    /// `addr`.
    pub fn address(&self, addr: IpAddr) -> Result<(), Limited> {
        self.buckets()
            .address
            .check(&self.prefixes.client(addr), Bucket::Address)
    }

    /// The failed-attempt rule now in force.
    pub fn login_rule(&self) -> LoginRule {
        self.buckets().logins
    }
}

/// The failed-attempt rule of one account (`login_failures_free`,
/// `login_delay_max`): past `free` failures from addresses the account has
/// not logged in from, each further attempt from such an address waits a
/// delay that doubles per failure, up to `max`. An address the account
/// logged in from is never delayed (its attempts count only against
/// `auth_per_minute`), so guessing from elsewhere cannot lock the user out
/// of their own devices. The counts live in Postgres
/// (`store::throttle`), judged here.
#[derive(Debug, Clone, Copy)]
pub struct LoginRule {
    free: u32,
    max: Duration,
}

/// What an attempt may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// Go ahead, counted as a failure until it proves right.
    Counted,
    /// Go ahead uncounted: from an address the account logged in from.
    Known,
}

impl LoginRule {
    fn new(config: &RateLimitsConfig) -> LoginRule {
        LoginRule {
            free: config.login_failures_free,
            max: config.login_delay_max.get(),
        }
    }

    fn delay(&self, failures: u32) -> Duration {
        if failures < self.free {
            return Duration::ZERO;
        }
        let doublings = (failures - self.free).min(30);
        FIRST_DELAY.saturating_mul(1 << doublings).min(self.max)
    }

    /// Judges an attempt against the account's failures so far.
    pub fn judge(&self, seen: &Seen) -> Result<Attempt, Limited> {
        if seen.known_address {
            return Ok(Attempt::Known);
        }
        let wait = self.delay(seen.failures);
        match seen.since_last_failure {
            Some(waited) if waited < wait => Err(Limited {
                bucket: Bucket::Login,
                retry_after: wait - waited,
            }),
            _ => Ok(Attempt::Counted),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn buckets_refuse_past_the_burst_and_name_a_wait() {
        let config = RateLimitsConfig {
            account_per_second: 1,
            account_burst: 3,
            ..RateLimitsConfig::default()
        };
        let limits = Limits::new(&config, ClientPrefixes::default());
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        for _ in 0..3 {
            limits.account(a).unwrap();
        }
        let limited = limits.account(a).unwrap_err();
        assert_eq!(limited.bucket, Bucket::Account);
        assert!(
            limited.retry_after > Duration::ZERO && limited.retry_after <= Duration::from_secs(1)
        );
        assert!(limits.account(b).is_ok(), "accounts are independent");
        limits.reconfigure(&RateLimitsConfig {
            account_burst: 10,
            ..config
        });
        assert!(
            limits.account(a).is_ok(),
            "a new configuration starts afresh"
        );
    }

    #[test]
    fn each_node_enforces_its_share_and_clients_are_prefixes() {
        let config = RateLimitsConfig {
            account_per_second: 30,
            account_burst: 9,
            address_burst: 2,
            ..RateLimitsConfig::default()
        };
        let limits = Limits::new(&config, ClientPrefixes::default());
        limits.set_nodes(3);
        let a = Uuid::new_v4();
        for _ in 0..3 {
            limits.account(a).unwrap();
        }
        let limited = limits.account(a).unwrap_err();
        assert!(
            limited.retry_after <= Duration::from_millis(100),
            "a third of 30/s: one every 100 ms, {limited:?}"
        );
        // One /64: one client.
        limits.address(addr("2001:db8::1")).unwrap();
        limits.address(addr("2001:db8::2")).unwrap();
        assert!(limits.address(addr("2001:db8::3")).is_err());
        assert!(limits.address(addr("2001:db8:0:1::1")).is_ok());
    }

    #[test]
    fn failed_logins_delay_strangers_but_never_a_known_address() {
        let rule = LoginRule {
            free: 2,
            max: Duration::from_secs(8),
        };
        let seen = |failures, since: u64, known_address| Seen {
            failures,
            since_last_failure: (failures > 0).then(|| Duration::from_secs(since)),
            known_address,
        };
        assert_eq!(rule.judge(&seen(0, 0, false)), Ok(Attempt::Counted));
        assert_eq!(rule.judge(&seen(1, 0, false)), Ok(Attempt::Counted));
        // Two failures: the next stranger waits 1 s, then 2, 4, 8, 8.
        for (failures, wait) in [(2, 1), (3, 2), (4, 4), (5, 8), (6, 8), (40, 8)] {
            let limited = rule.judge(&seen(failures, 0, false)).unwrap_err();
            assert_eq!(limited.bucket, Bucket::Login);
            assert_eq!(limited.retry_after, Duration::from_secs(wait));
            assert_eq!(
                rule.judge(&seen(failures, wait, false)),
                Ok(Attempt::Counted)
            );
        }
        assert_eq!(
            rule.judge(&seen(2, 0, false)).unwrap_err().retry_after,
            Duration::from_secs(1)
        );
        assert_eq!(
            rule.judge(&seen(40, 0, true)),
            Ok(Attempt::Known),
            "the user's own address is never delayed"
        );
    }
}
