//! Starting child processes that never outlive keepd.
//!
//! Linux's parent-death signal (`PR_SET_PDEATHSIG`) fires when the *thread*
//! that forked the child exits, not the process. Tokio's blocking threads
//! retire when idle, so a child forked from one would be killed at random.
//! Every child is therefore forked by one dedicated thread that lives exactly
//! as long as the keepd process: when keepd exits or is killed with -9, the
//! kernel signals the child.
//!
//! Elsewhere (macOS under launchd) there is no parent-death signal: a child
//! outlives a keepd killed with -9, and the next start finds its
//! `postmaster.pid` and shuts that postmaster down
//! (`NativeCluster::is_our_postmaster`).

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::sync::mpsc;

use nix::sys::signal::Signal;

struct Request {
    command: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

/// Forks children from the one long-lived launcher thread.
pub struct ChildLauncher {
    requests: mpsc::Sender<Request>,
}

static LAUNCHER: OnceLock<ChildLauncher> = OnceLock::new();

impl ChildLauncher {
    /// The process-wide launcher, started on first use.
    pub fn get() -> &'static ChildLauncher {
        LAUNCHER.get_or_init(|| {
            let (requests, incoming) = mpsc::channel::<Request>();
            std::thread::Builder::new()
                .name("keepd-launcher".into())
                .spawn(move || {
                    for mut request in incoming {
                        let _ = request.reply.send(request.command.spawn());
                    }
                    // Unreachable while the static sender lives; never let
                    // this thread's exit kill the children it forked.
                    loop {
                        std::thread::park();
                    }
                })
                .expect("cannot start the keepd-launcher thread");
            ChildLauncher { requests }
        })
    }

    /// Spawns `command` so that the kernel sends it `on_keepd_death` when
    /// keepd dies, however it dies (Linux; elsewhere the signal is not
    /// set).
    pub fn spawn(&self, mut command: Command, on_keepd_death: Signal) -> io::Result<Child> {
        let keepd = nix::unistd::getpid();
        #[cfg(not(target_os = "linux"))]
        let _ = on_keepd_death;
        // SAFETY: the closure runs between fork and exec and only makes the
        // async-signal-safe prctl and getppid system calls.
        unsafe {
            command.pre_exec(move || {
                // Runs after Command::uid, so a credential change cannot
                // clear the setting again.
                #[cfg(target_os = "linux")]
                nix::sys::prctl::set_pdeathsig(on_keepd_death).map_err(io::Error::from)?;
                // keepd may have died before the line above took effect.
                if nix::unistd::getppid() != keepd {
                    return Err(io::Error::other("keepd exited while starting a child"));
                }
                Ok(())
            });
        }
        let (reply, answer) = mpsc::channel();
        self.requests
            .send(Request { command, reply })
            .map_err(|_| io::Error::other("the keepd-launcher thread is gone"))?;
        answer
            .recv()
            .map_err(|_| io::Error::other("the keepd-launcher thread is gone"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_are_spawned_and_waited() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "exit 7"]);
        let mut child = ChildLauncher::get().spawn(cmd, Signal::SIGTERM).unwrap();
        assert_eq!(child.wait().unwrap().code(), Some(7));
    }

    #[test]
    fn spawn_errors_are_reported() {
        let cmd = Command::new("/nonexistent/keepd-test-binary");
        let err = ChildLauncher::get()
            .spawn(cmd, Signal::SIGTERM)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn launcher_thread_survives_the_spawning_thread() {
        // A child spawned from a short-lived thread must not get its
        // parent-death signal when that thread exits.
        let child = std::thread::spawn(|| {
            let mut cmd = Command::new("sleep");
            cmd.arg("2");
            ChildLauncher::get().spawn(cmd, Signal::SIGKILL).unwrap()
        })
        .join()
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let mut child = child;
        assert!(
            child.try_wait().unwrap().is_none(),
            "child was killed early"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
