//! Failed admin logins, counted per client address in fixed windows, so that the
//! admin token cannot be guessed at line speed: once an address has failed
//! `failures` times within `window`, its attempts are refused until the window ends,
//! without the token being looked at.
//!
//! A counter in a `Mutex<HashMap>` rather than a rate-limiter crate (`governor`):
//! an attempt is counted *before* its token is checked and given back when the token
//! was right, so that concurrent guesses cannot slip past the count while they are
//! being checked; governor can take a cell but neither give one back nor look without
//! taking, and its keyed state grows with every address until pruned by hand.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most client addresses tracked at once: past it, windows that have ended are
/// dropped, then the oldest one.
const MAX_CLIENTS: usize = 4096;

/// The failed logins of each client address.
#[derive(Debug)]
pub struct LoginLimit {
    failures: u32,
    window: Duration,
    clients: Mutex<HashMap<IpAddr, Window>>,
}

/// One address's current window: when its first counted attempt came, and how many
/// attempts it holds.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    attempts: u32,
}

impl LoginLimit {
    /// At most `failures` failed logins per client address within `window`.
    pub fn new(failures: u32, window: Duration) -> Self {
        LoginLimit {
            failures,
            window,
            clients: Mutex::default(),
        }
    }

    /// Counts an attempt from `client` made at `now`, to be given back with
    /// [`LoginLimit::succeeded`] if its token is right. `Err` holds how long until
    /// `client` may try again: it has used up its failures in this window, and this
    /// attempt is not counted.
    pub fn attempt(&self, client: IpAddr, now: Instant) -> Result<(), Duration> {
        let key = client_key(client);
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if !clients.contains_key(&key) {
            self.make_room(&mut clients, now);
        }
        let window = clients.entry(key).or_insert(Window {
            start: now,
            attempts: 0,
        });
        let elapsed = now.saturating_duration_since(window.start);
        if elapsed >= self.window {
            *window = Window {
                start: now,
                attempts: 0,
            };
        } else if window.attempts >= self.failures {
            return Err(self.window - elapsed);
        }
        window.attempts += 1;
        Ok(())
    }

    /// Gives back the attempt counted for `client`: its token was right.
    pub fn succeeded(&self, client: IpAddr) {
        let key = client_key(client);
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(window) = clients.get_mut(&key) {
            window.attempts = window.attempts.saturating_sub(1);
            if window.attempts == 0 {
                clients.remove(&key);
            }
        }
    }

    /// Keeps the map under [`MAX_CLIENTS`] before an address joins it.
    fn make_room(&self, clients: &mut HashMap<IpAddr, Window>, now: Instant) {
        if clients.len() < MAX_CLIENTS {
            return;
        }
        clients.retain(|_, w| now.saturating_duration_since(w.start) < self.window);
        if clients.len() >= MAX_CLIENTS
            && let Some(oldest) = clients.iter().min_by_key(|(_, w)| w.start).map(|(k, _)| *k)
        {
            clients.remove(&oldest);
        }
    }
}

/// What is counted for an address: an IPv4 address as it is (an IPv4-mapped IPv6
/// address as the IPv4 one), an IPv6 address by its /64 prefix, the block one host
/// is usually given, so that a host cannot step past its count by changing address.
fn client_key(client: IpAddr) -> IpAddr {
    match client.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !u128::from(u64::MAX);
            IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(300);

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn an_address_that_used_up_its_failures_waits_for_the_window_to_end() {
        let limit = LoginLimit::new(3, WINDOW);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limit.attempt(ip("192.0.2.1"), t0), Ok(()));
        }
        let later = t0 + Duration::from_secs(100);
        assert_eq!(
            limit.attempt(ip("192.0.2.1"), later),
            Err(Duration::from_secs(200))
        );
        assert_eq!(
            limit.attempt(ip("192.0.2.2"), later),
            Ok(()),
            "another address has its own count"
        );
        assert_eq!(limit.attempt(ip("192.0.2.1"), t0 + WINDOW), Ok(()));
    }

    #[test]
    fn a_successful_login_is_not_counted() {
        let limit = LoginLimit::new(2, WINDOW);
        let t0 = Instant::now();
        for _ in 0..5 {
            assert_eq!(limit.attempt(ip("192.0.2.1"), t0), Ok(()));
            limit.succeeded(ip("192.0.2.1"));
        }
        assert!(limit.clients.lock().unwrap().is_empty());
        limit.attempt(ip("192.0.2.1"), t0).unwrap();
        limit.attempt(ip("192.0.2.1"), t0).unwrap();
        assert!(limit.attempt(ip("192.0.2.1"), t0).is_err());
    }

    #[test]
    fn an_ipv6_host_is_counted_by_its_64_prefix() {
        let limit = LoginLimit::new(1, WINDOW);
        let t0 = Instant::now();
        limit.attempt(ip("2001:db8:1:2::1"), t0).unwrap();
        assert!(limit.attempt(ip("2001:db8:1:2:ffff::9"), t0).is_err());
        assert_eq!(limit.attempt(ip("2001:db8:1:3::1"), t0), Ok(()));
        limit.attempt(ip("::ffff:192.0.2.7"), t0).unwrap();
        assert!(limit.attempt(ip("192.0.2.7"), t0).is_err(), "IPv4-mapped");
    }

    #[test]
    fn tracked_addresses_are_bounded() {
        let limit = LoginLimit::new(1, WINDOW);
        let t0 = Instant::now();
        let first = ip("10.0.0.0");
        limit.attempt(first, t0).unwrap();
        for n in 1..=MAX_CLIENTS as u32 {
            let at = t0 + Duration::from_millis(u64::from(n));
            limit
                .attempt(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n)), at)
                .unwrap();
        }
        assert_eq!(limit.clients.lock().unwrap().len(), MAX_CLIENTS);
        assert_eq!(
            limit.attempt(first, t0 + Duration::from_secs(1)),
            Ok(()),
            "the oldest address was forgotten"
        );
    }
}
