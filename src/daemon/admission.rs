//! A node the cluster has not admitted yet: it serves 503s with the
//! reason and looks for its sealed key until an operator admits it, or,
//! with a join token, until a member does (saying why not while its token
//! does not admit it: revoked, expired, used up, forged, unknown).

use std::time::Duration;

use tracing::{info, warn};

use super::listeners::serving;
use super::signals::Signals;
use super::{DaemonError, Provisioned};
use crate::api;
use crate::cluster::by_token::{self, Standing};
use crate::cluster::{self, ClusterKey, JoinToken, Membership};
use crate::config::Config;
use crate::edge::{self, EdgeSettings, TrustedProxies};
use crate::identity::fingerprint;
use crate::shutdown;

/// How often a node waiting to be admitted looks for its sealed key.
const ADMISSION_POLL: Duration = Duration::from_secs(2);

/// The token in `cluster.join_token_file`, if set; a file that cannot be
/// read or holds no token stops the start (exit 2), naming the file. The
/// token itself is never logged (its id is).
pub(super) fn join_token(config: &Config) -> Result<Option<JoinToken>, DaemonError> {
    let Some(path) = &config.cluster.join_token_file else {
        return Ok(None);
    };
    let bad = |reason: String| DaemonError::JoinToken {
        path: path.clone(),
        reason,
    };
    let text =
        zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?);
    JoinToken::parse(&text)
        .map(Some)
        .map_err(|e| bad(e.to_string()))
}

impl Provisioned {
    /// A node the cluster has not admitted: answers 503 with the reason on
    /// every route and looks for its sealed key every ADMISSION_POLL until
    /// an operator admits it, or it is told to stop (`NotAdmitted`).
    pub(super) async fn await_admission(
        &self,
        socket: &std::net::TcpListener,
        field_versions: u32,
        token: Option<&JoinToken>,
        signals: &mut Signals,
    ) -> Result<ClusterKey, DaemonError> {
        let node = &self.node;
        let (stop, shutdown) = shutdown::channel();
        let trusted = TrustedProxies::new(&node.config.api.trusted_proxies);
        // A second descriptor of the socket: the API serves the first.
        let copy = socket.try_clone().map_err(|source| DaemonError::Listen {
            what: "api.listen",
            addr: node.config.api.listen.to_string(),
            source,
        })?;
        let listener = serving("api.listen", copy)?;
        let addr = listener.local_addr().map_err(DaemonError::Serve)?;
        info!(%addr, node_id = node.node_id, state = "pending", "api listening");
        let server = tokio::spawn(edge::serve(
            listener,
            api::pending_router(node.node_id.clone()),
            EdgeSettings::new(&node.config.api, trusted, node.api_cert.clone()),
            self.metrics.clone(),
            shutdown,
        ));
        match token {
            None => warn!(
                node_id = node.node_id,
                fingerprint = fingerprint(&node.identity.public_key()),
                "cluster: waiting to be admitted; on an admitted node, check that `keepd cluster \
                 pending` shows this fingerprint, then run `keepd cluster admit {}`",
                node.node_id
            ),
            Some(token) => info!(
                node_id = node.node_id,
                fingerprint = fingerprint(&node.identity.public_key()),
                token = token.id(),
                "cluster: waiting to be admitted by join token"
            ),
        }
        // What the token's standing was last said to be: each change once.
        let mut said: Option<Standing> = None;
        node.notifier
            .status("waiting to be admitted to the cluster");
        let outcome = loop {
            tokio::select! {
                _ = tokio::time::sleep(ADMISSION_POLL) => {}
                _ = signals.stop() => break Err(DaemonError::NotAdmitted),
            }
            let joined = async {
                let mut client = self
                    .superuser
                    .connect()
                    .await
                    .map_err(DaemonError::Connect)?;
                let joined =
                    cluster::join(&mut client, &node.identity, field_versions, token).await?;
                let standing = match (&joined, token) {
                    (Membership::Pending, Some(token)) => {
                        Some(by_token::standing(&client, token).await?)
                    }
                    _ => None,
                };
                Ok::<_, DaemonError>((joined, standing))
            };
            match joined.await {
                Ok((Membership::Member(key), _)) => {
                    info!(node_id = node.node_id, "cluster: admitted");
                    break Ok(key);
                }
                Ok((Membership::Pending, Some(standing))) if said.as_ref() != Some(&standing) => {
                    let token = token.map_or("", JoinToken::id);
                    match standing {
                        Standing::Valid => info!(token, "cluster: join token {standing}"),
                        _ => warn!(
                            token,
                            "cluster: not admitted by join token: {standing}; waiting for a \
                             valid token or an operator (`keepd cluster admit {}`)",
                            node.node_id
                        ),
                    }
                    said = Some(standing);
                }
                Ok((Membership::Pending, _)) => {}
                // Postgres restarting, say: the next look may succeed.
                Err(e) => warn!(error = %e, "cluster: cannot look for this node's admission"),
            }
        };
        stop.trigger();
        server.await?.map_err(DaemonError::Serve)?;
        outcome
    }
}
