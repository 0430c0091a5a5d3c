//! Running the real `keybroker` binary in a temp dir, and talking to its socket.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tempfile::TempDir;

pub const BIN: &str = env!("CARGO_BIN_EXE_keybroker");

/// A temp dir holding a config, a token file and the socket.
pub struct Env {
    pub dir: TempDir,
}

impl Env {
    pub fn new() -> Self {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn socket(&self) -> PathBuf {
        self.path("run/keybroker.sock")
    }

    /// The daemon's state directory (ledger, lock, instance id).
    pub fn state_dir(&self) -> PathBuf {
        self.path("state")
    }

    /// Writes a private file (mode 0600).
    pub fn secret_file(&self, name: &str, content: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    pub fn config(&self, toml: &str) -> PathBuf {
        let p = self.path("keybroker.toml");
        std::fs::write(&p, toml).unwrap();
        p
    }

    /// A command for the binary with this env's socket and a clean environment.
    pub fn command(&self, args: &[&str]) -> Command {
        self.program(BIN, args)
    }

    /// A command for `program` in this env's clean environment.
    pub fn program(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new(program);
        c.args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("KEYBROKER_SOCKET", self.socket())
            .env("STATE_DIRECTORY", self.state_dir())
            .env("HOME", self.dir.path())
            .current_dir(self.dir.path());
        c
    }

    /// Runs the binary to completion: (exit code, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (i32, String, String) {
        outcome(self.command(args).output().unwrap())
    }

    /// [`Env::run`] as user and group `id` (the caller must be root).
    pub fn run_as(&self, id: u32, args: &[&str]) -> (i32, String, String) {
        use std::os::unix::process::CommandExt;
        outcome(self.command(args).uid(id).gid(id).output().unwrap())
    }

    /// Starts `serve --config` with stderr captured to a file, and waits until it answers.
    pub fn serve(&self, config: &Path, rust_log: &str) -> Daemon {
        self.serve_with(config, rust_log, &[])
    }

    /// [`Env::serve`] with extra environment variables.
    pub fn serve_with(&self, config: &Path, rust_log: &str, vars: &[(&str, &str)]) -> Daemon {
        let mut command = self.command(&["serve", "--config", config.to_str().unwrap()]);
        command.envs(vars.iter().copied()).env("RUST_LOG", rust_log);
        self.start_daemon(command, self.socket())
    }

    /// Starts a daemon from `command` (`serve`, or a wrapper that execs it) with stderr
    /// captured, logging at `info` unless the command says otherwise, and waits until it
    /// answers on `socket`.
    pub fn start_daemon(&self, mut command: Command, socket: PathBuf) -> Daemon {
        if !command.get_envs().any(|(k, _)| k == "RUST_LOG") {
            command.env("RUST_LOG", "info");
        }
        let log = self.path("daemon.log");
        let child = command
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut d = Daemon {
            child: Some(child),
            log,
            socket,
        };
        d.wait_ready();
        d
    }
}

pub struct Daemon {
    pub child: Option<Child>,
    pub log: PathBuf,
    pub socket: PathBuf,
}

impl Daemon {
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(a) = keybroker::client::get(&self.socket, "/healthz", Duration::from_secs(1))
            {
                if a.status == 200 {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited early with {status}: {}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("daemon not ready after 20s: {}", self.logs());
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            f.read_to_string(&mut s).unwrap();
        }
        s
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// kill -9, and wait until the process is gone.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn signal(&self, signal: rustix::process::Signal) {
        rustix::process::kill_process(rustix::process::Pid::from_raw(self.pid()).unwrap(), signal)
            .unwrap();
    }

    /// Sends SIGTERM and waits for the exit: (status, time from signal to exit).
    pub fn stop(&mut self, limit: Duration) -> (ExitStatus, Duration) {
        let start = Instant::now();
        self.signal(rustix::process::Signal::TERM);
        let mut child = self.child.take().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status, start.elapsed());
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                panic!(
                    "daemon still running {limit:?} after SIGTERM: {}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn outcome(out: std::process::Output) -> (i32, String, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `ok` every 20 ms until it holds; fails the test after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One GET over the Unix socket with hyper: (status, headers, body).
pub async fn get(socket: &Path, path: &str) -> (u16, http::HeaderMap, Bytes) {
    request(socket, http::Method::GET, path).await
}

/// One bodiless request over the Unix socket with hyper: (status, headers, body).
pub async fn request(
    socket: &Path,
    method: http::Method,
    path: &str,
) -> (u16, http::HeaderMap, Bytes) {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "keybroker")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    (
        parts.status.as_u16(),
        parts.headers,
        body.collect().await.unwrap().to_bytes(),
    )
}

/// The `AccessKeyId` of a credential_process body.
pub fn key_id(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    v["AccessKeyId"].as_str().unwrap().to_string()
}

/// A CoreWeave profile against the fake at `endpoint`.
pub fn coreweave_profile(name: &str, endpoint: &str, token_file: &Path, extra: &str) -> String {
    format!(
        "[profiles.{name}]\nprovider = \"coreweave\"\nendpoint = \"{endpoint}\"\ntoken_file = \"{}\"\n{extra}\n",
        token_file.display()
    )
}

/// Runs the shell `script` (with `args` as `$1`...) as root in a private mount namespace and
/// its own pid namespace, whatever it leaves running dying with it, from the directory of the
/// binary under test (reachable as `.` once the script mounts over /tmp, where it may be).
pub fn in_private_namespace(env: &Env, script: &str, args: &[&str]) -> std::process::Output {
    assert!(
        rustix::process::getuid().is_root(),
        "this test mounts and runs as other users; it needs root (CI runs as root)"
    );
    let mut all = vec![
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--fork",
        "--kill-child",
        "sh",
        "-c",
        script,
        "sh",
    ];
    all.extend_from_slice(args);
    env.program("unshare", &all)
        .current_dir(Path::new(BIN).parent().unwrap())
        .output()
        .unwrap()
}

/// The Python of the test virtualenv (`$KEYBROKER_TEST_PYTHON`, else `.venv/bin/python`).
pub fn python() -> PathBuf {
    std::env::var_os("KEYBROKER_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python")))
}

/// The virtualenv's bin directory (aws, python).
pub fn venv_bin() -> PathBuf {
    python().parent().unwrap().to_path_buf()
}
