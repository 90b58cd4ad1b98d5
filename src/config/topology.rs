//! `Topology`: how keepd reaches its Postgres, decided once from the
//! configuration (which provider runs it, and over which transport), so no
//! module decides "are we on TCP?" for itself.

use super::{Config, Provider};

/// How connections to Postgres travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A Unix socket in a 0700 directory; no TCP listener at all.
    UnixSocket,
    /// TCP with TLS.
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub provider: Provider,
    pub transport: Transport,
}

impl Topology {
    pub fn of(config: &Config) -> Topology {
        let provider = config.database.postgres.provider;
        // An external server is always reached over the network.
        let transport = if provider == Provider::External || !config.network.use_unix_socket {
            Transport::Tcp
        } else {
            Transport::UnixSocket
        };
        Topology {
            provider,
            transport,
        }
    }

    /// Whether the Postgres superuser is keepd's own (its password made,
    /// sealed and rotated by keepd) rather than an external server's
    /// administrator.
    pub fn owns_superuser(&self) -> bool {
        self.provider != Provider::External
    }

    pub fn is_tcp(&self) -> bool {
        self.transport == Transport::Tcp
    }

    /// keepd runs the server and talks TCP to it, so keepd's node CA
    /// issues its certificates (an external server brings its own).
    pub fn issues_certificates(&self) -> bool {
        self.is_tcp() && self.provider != Provider::External
    }

    /// The setting that bounds the wait for the server at start.
    pub fn start_timeout_key(&self) -> &'static str {
        match self.provider {
            Provider::Native => "database.postgres.native.start_timeout",
            Provider::Docker => "database.postgres.docker.start_timeout",
            Provider::External => "database.postgres.external.start_timeout",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_is_always_tcp_and_brings_its_own_certificates() {
        let mut config = Config::default();
        let t = Topology::of(&config);
        assert_eq!(t.transport, Transport::UnixSocket);
        assert!(!t.issues_certificates());
        config.network.use_unix_socket = false;
        assert!(Topology::of(&config).issues_certificates());
        config.database.postgres.provider = Provider::External;
        config.network.use_unix_socket = true;
        let t = Topology::of(&config);
        assert!(t.is_tcp() && !t.issues_certificates());
        assert_eq!(
            t.start_timeout_key(),
            "database.postgres.external.start_timeout"
        );
    }
}
