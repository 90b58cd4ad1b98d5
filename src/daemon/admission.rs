//! A node the cluster has not admitted yet: it serves 503s with the
//! reason and looks for its sealed key until an operator admits it.

use std::time::Duration;

use tracing::{info, warn};

use super::listeners::serving;
use super::signals::Signals;
use super::{DaemonError, Provisioned};
use crate::api;
use crate::cluster::{self, ClusterKey, Membership};
use crate::edge::{self, EdgeSettings, TrustedProxies};
use crate::identity::fingerprint;
use crate::shutdown;

/// How often a node waiting to be admitted looks for its sealed key.
const ADMISSION_POLL: Duration = Duration::from_secs(2);

impl Provisioned {
    /// A node the cluster has not admitted: answers 503 with the reason on
    /// every route and looks for its sealed key every ADMISSION_POLL until
    /// an operator admits it, or it is told to stop (`NotAdmitted`).
    pub(super) async fn await_admission(
        &self,
        socket: &std::net::TcpListener,
        field_versions: u32,
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
        warn!(
            node_id = node.node_id,
            fingerprint = fingerprint(&node.identity.public_key()),
            "cluster: waiting to be admitted; on an admitted node, check that `keepd cluster \
             pending` shows this fingerprint, then run `keepd cluster admit {}`",
            node.node_id
        );
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
                Ok::<_, DaemonError>(
                    cluster::join(&mut client, &node.identity, field_versions).await?,
                )
            };
            match joined.await {
                Ok(Membership::Member(key)) => {
                    info!(node_id = node.node_id, "cluster: admitted");
                    break Ok(key);
                }
                Ok(Membership::Pending) => {}
                // Postgres restarting, say: the next look may succeed.
                Err(e) => warn!(error = %e, "cluster: cannot look for this node's admission"),
            }
        };
        stop.trigger();
        server.await?.map_err(DaemonError::Serve)?;
        outcome
    }
}
