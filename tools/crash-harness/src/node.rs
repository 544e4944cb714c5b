//! The `receiver-node` process: its configuration, starting it, waiting for `/health`, stopping
//! it with SIGTERM.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A loopback port nothing listens on right now.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The node's configuration: `node_id`, fsync `always` (the default), WAL in `data_dir`, the
/// feed's `[[receiver]]` section, any `more_outputs` and then a `dir` output in `lines` format
/// (after them: a kill between a destination's write and the batch's completion makes the batch
/// run again, which an exactly-once destination must skip),
/// metrics (and `/health`) on `metrics`.
pub fn config(
    node_id: &str,
    data_dir: &Path,
    receiver: &str,
    out_dir: &Path,
    more_outputs: &str,
    metrics: SocketAddr,
) -> String {
    format!(
        "node_id = {node_id:?}\ndata_dir = {data:?}\n\n[engine]\nbatch_interval_ms = 200\nblock_interval_ms = 20\n\n\
         {receiver}\n{more_outputs}\
         [[output]]\ntype = \"dir\"\npath = {out:?}\nformat = \"lines\"\n\n[metrics]\naddress = \"{metrics}\"\n",
        data = data_dir.display().to_string(),
        out = out_dir.display().to_string(),
    )
}

/// Whether the node answers `GET /health` with 200.
pub fn healthy(metrics: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&metrics, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 32];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"HTTP/1.1 200"))
}

/// Starts `node run --config config`, its stderr appended to `log`.
pub fn start_node(node: &Path, config: &Path, log: &Path) -> std::io::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    Command::new(node)
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
}

/// Waits until the node is healthy (at most 60 s); returns how long that took.
pub fn wait_healthy(child: &mut Child, metrics: SocketAddr) -> Result<Duration, String> {
    let t0 = Instant::now();
    while !healthy(metrics) {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("receiver-node exited during recovery: {status}"));
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err("receiver-node not healthy after 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(t0.elapsed())
}

/// Graceful stop: SIGTERM, then waits up to 60 s for the exit; `None` if the node did not exit
/// in time (it is then killed).
pub fn terminate(child: &mut Child) -> Option<ExitStatus> {
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let t0 = Instant::now();
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The node process under test, killed and reaped when dropped: if the harness gives up on the
/// way (a setup error, a producer error), no node outlives it. After [`terminate`] the process
/// has exited and the drop does nothing.
pub struct NodeProcess(pub Child);

impl std::ops::Deref for NodeProcess {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for NodeProcess {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
