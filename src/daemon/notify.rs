//! The systemd notification protocol (sd_notify), spoken directly: one
//! datagram per message to `NOTIFY_SOCKET`. Outside systemd (no socket)
//! every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use tracing::warn;

pub struct Notifier {
    socket: Option<(UnixDatagram, String)>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let socket = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|path| !path.is_empty())
            .and_then(|path| UnixDatagram::unbound().ok().map(|s| (s, path)));
        Notifier { socket }
    }

    fn send(&self, message: &str) {
        let Some((socket, path)) = &self.socket else {
            return;
        };
        let sent = match path.strip_prefix('@') {
            // An abstract socket name: Linux's (and systemd's) only.
            #[cfg(target_os = "linux")]
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                    .and_then(|addr| socket.send_to_addr(message.as_bytes(), &addr))
            }
            #[cfg(not(target_os = "linux"))]
            Some(_) => Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "an abstract socket name in NOTIFY_SOCKET, which only Linux has",
            )),
            None => socket.send_to(message.as_bytes(), path),
        };
        if let Err(e) = sent {
            warn!(error = %e, "cannot notify systemd");
        }
    }

    /// What keepd is doing, for `systemctl status`.
    pub fn status(&self, text: &str) {
        self.send(&format!("STATUS={text}"));
    }

    /// The API serves.
    pub fn ready(&self) {
        self.send("READY=1\nSTATUS=serving");
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping");
    }

    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    /// Pings the watchdog every half of its timeout until `stop`, when
    /// systemd asked for one for this process.
    pub fn spawn_watchdog(
        mut stop: crate::shutdown::Shutdown,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let every = Self::watchdog_interval()?;
        Some(tokio::spawn(async move {
            let notifier = Notifier::from_env();
            loop {
                notifier.watchdog();
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.requested() => return,
                }
            }
        }))
    }

    /// How often to ping the watchdog (half its timeout), when systemd
    /// asked for one for this process.
    fn watchdog_interval() -> Option<Duration> {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        if let Ok(pid) = std::env::var("WATCHDOG_PID")
            && pid.parse::<u32>().ok() != Some(std::process::id())
        {
            return None;
        }
        (usec > 0).then(|| Duration::from_micros(usec / 2))
    }
}
