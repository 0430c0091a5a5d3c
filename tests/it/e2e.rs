//! Real clients end to end: aws-cli and boto3 use keys from keybroker against moto's S3, which
//! checks every request's signature against the keys in its IAM. The fake cloud mints into that
//! IAM, so a key that works is really a key, and a revoked one really stops working.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::fake_cloud::{stop_leaving_no_key, FakeCloud, PROVIDERS, WIF_ISSUER};
use crate::harness::{python, venv_bin, Daemon, Env, BIN};
use crate::moto::Moto;

/// A running scenario: moto, the fake cloud mirrored into it, and a daemon serving profile `p`
/// on its socket and on the container endpoint.
struct E2e {
    env: Env,
    fake: Arc<FakeCloud>,
    moto: Arc<Moto>,
    daemon: Daemon,
    container_port: u16,
}

fn write_script(path: PathBuf, body: &str) -> PathBuf {
    std::fs::write(&path, body).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

impl E2e {
    async fn start(provider: &str) -> E2e {
        let moto = Arc::new(tokio::task::block_in_place(Moto::start));
        let fake = FakeCloud::mirrored(Arc::clone(&moto));
        let url = fake.serve().await;
        let env = Env::new();
        let container_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = env.config(&format!(
            "[server.container]\nlisten = \"127.0.0.1:{container_port}\"\n\n{}",
            fake.profile_toml(provider, "p", &url, &env, "")
        ));
        let daemon = tokio::task::block_in_place(|| env.serve(&config, "info"));
        let socket = daemon.socket.display().to_string();
        // credential_process through a wrapper that counts how often the SDK spawns it.
        let count = env.path("helper-runs");
        let helper = write_script(
            env.path("helper.sh"),
            &format!("#!/bin/sh\necho run >> {}\nexec {BIN} credential-process --profile p --socket {socket}\n", count.display()),
        );
        // The same, with one character of the secret changed: the test-only broken key.
        let tamper = write_script(
            env.path("tampered-helper.sh"),
            &format!(
                "#!/bin/sh\n{BIN} credential-process --profile p --socket {socket} | {} -c '{}'\n",
                python().display(),
                "import json,sys; d=json.load(sys.stdin); s=d[\"SecretAccessKey\"]; \
                 d[\"SecretAccessKey\"]=s[:-1]+(\"A\" if s[-1]!=\"A\" else \"B\"); print(json.dumps(d))"
            ),
        );
        std::fs::write(
            env.path("aws-config"),
            format!(
                "[profile kb]\ncredential_process = {}\nregion = us-east-1\n\n[profile tampered]\ncredential_process = {}\nregion = us-east-1\n",
                helper.display(),
                tamper.display()
            ),
        )
        .unwrap();
        E2e {
            env,
            fake,
            moto,
            daemon,
            container_port,
        }
    }

    /// A command in a clean environment that sees only the test's AWS config.
    fn command(&self, program: PathBuf) -> Command {
        let mut c = Command::new(program);
        c.env_clear()
            .env("PATH", format!("{}:/usr/bin:/bin", venv_bin().display()))
            .env("HOME", self.env.dir.path())
            .env("AWS_CONFIG_FILE", self.env.path("aws-config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                self.env.path("no-credentials"),
            )
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .current_dir(self.env.dir.path());
        c
    }

    /// `aws --profile P --endpoint-url moto ARGS`: (exit code, stdout, stderr).
    fn aws(&self, profile: &str, args: &[&str]) -> (i32, String, String) {
        let out = self
            .command(venv_bin().join("aws"))
            .args(["--profile", profile, "--endpoint-url", &self.moto.endpoint])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `tests/e2e/s3_calls.py MODE`: its one JSON line.
    fn s3_calls(&self, mode: &str, bucket: &str, n: u32, extra_env: &[(&str, String)]) -> Value {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/s3_calls.py");
        let mut c = self.command(python());
        c.args([script, mode, &self.moto.endpoint, bucket, &n.to_string()]);
        for (k, v) in extra_env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| {
            panic!(
                "{mode}: {e}: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    fn helper_runs(&self) -> usize {
        std::fs::read_to_string(self.env.path("helper-runs"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    fn token_file(&self) -> PathBuf {
        self.daemon
            .socket
            .parent()
            .unwrap()
            .join("container/p.token")
    }

    fn container_env(&self, token_file: PathBuf) -> Vec<(&'static str, String)> {
        vec![
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                format!(
                    "http://127.0.0.1:{}/v1/container-credentials/p",
                    self.container_port
                ),
            ),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                token_file.display().to_string(),
            ),
        ]
    }

    /// SIGTERM, exit 0, and no key the broker minted is alive at the fake (nor in moto).
    fn finish(mut self) {
        stop_leaving_no_key(&mut self.daemon, &self.fake);
        assert!(
            !self.token_file().exists(),
            "container token removed at stop"
        );
    }
}

/// `aws s3 mb`, `cp` and `ls` through `credential_process`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_cli_makes_copies_and_lists() {
    for provider in PROVIDERS {
        let e = E2e::start(provider).await;
        let file = e.env.path("hello.txt");
        std::fs::write(&file, "hello from keybroker\n").unwrap();
        let (code, _, err) = e.aws("kb", &["s3", "mb", "s3://kb-e2e"]);
        assert_eq!(code, 0, "{provider}: mb: {err}");
        let (code, _, err) = e.aws(
            "kb",
            &["s3", "cp", file.to_str().unwrap(), "s3://kb-e2e/hello.txt"],
        );
        assert_eq!(code, 0, "{provider}: cp: {err}");
        let (code, out, err) = e.aws("kb", &["s3", "ls", "s3://kb-e2e"]);
        assert_eq!(code, 0, "{provider}: ls: {err}");
        assert!(
            out.contains("hello.txt"),
            "{provider}: ls shows the object: {out}"
        );
        assert_eq!(
            e.helper_runs(),
            3,
            "{provider}: one helper run per aws command"
        );
        e.finish();
    }
}

/// One boto3 session making 200 S3 calls runs the helper exactly once: the key is served with
/// enough lifetime that botocore never refreshes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_session_of_200_calls_runs_the_helper_once() {
    for provider in PROVIDERS {
        let e = E2e::start(provider).await;
        let result = e.s3_calls("profile", "kb-calls", 200, &[]);
        assert_eq!(result["ok"], true, "{provider}: {result}");
        assert_eq!(result["calls"], 200);
        assert_eq!(
            e.helper_runs(),
            1,
            "{provider}: helper spawned once for 200 calls"
        );
        e.finish();
    }
}

/// boto3 with `AWS_CONTAINER_CREDENTIALS_FULL_URI` and the token file works; a wrong token gets
/// 401 and the SDK's error says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_through_the_container_endpoint() {
    for provider in PROVIDERS {
        let e = E2e::start(provider).await;
        let meta = std::fs::metadata(e.token_file()).unwrap();
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o600,
            "token file is private"
        );
        let status =
            keybroker::client::get(&e.daemon.socket, "/v1/status", Duration::from_secs(5)).unwrap();
        let status: Value = serde_json::from_slice(&status.body).unwrap();
        assert_eq!(
            status["profiles"][0]["container_token_file"],
            e.token_file().display().to_string()
        );

        let result = e.s3_calls(
            "container",
            "kb-container",
            5,
            &e.container_env(e.token_file()),
        );
        assert_eq!(result["ok"], true, "{provider}: {result}");
        assert_eq!(e.helper_runs(), 0, "no process was spawned");

        let wrong = e.env.path("wrong.token");
        std::fs::write(&wrong, "not-the-token").unwrap();
        let result = e.s3_calls("container", "kb-container", 1, &e.container_env(wrong));
        let error = result["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("401") && error.contains("wrong Authorization token"),
            "{provider}: {result}"
        );
        e.finish();
    }
}

/// Keys a client still holds stop working once the daemon has stopped: revoked for real.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_stop_working_when_the_daemon_stops() {
    for provider in PROVIDERS {
        let mut e = E2e::start(provider).await;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/s3_calls.py");
        let mut child = e
            .command(python())
            .args([script, "two-phase", &e.moto.endpoint, "kb-revoked"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        tokio::task::block_in_place(|| stdout.read_line(&mut line)).unwrap();
        assert!(
            line.contains("\"phase\": 1"),
            "{provider}: first call: {line}"
        );

        let (status, _) = tokio::task::block_in_place(|| e.daemon.stop(Duration::from_secs(25)));
        assert!(status.success());
        assert!(e.fake.live().is_empty());

        writeln!(child.stdin.take().unwrap()).unwrap();
        line.clear();
        tokio::task::block_in_place(|| stdout.read_line(&mut line)).unwrap();
        let result: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            result["error_code"], "InvalidAccessKeyId",
            "{provider}: {result}"
        );
        // The CLI, which runs the helper again, gets a clear error instead of a key.
        let (code, _, err) = e.aws("kb", &["s3", "ls"]);
        assert_ne!(code, 0);
        assert!(err.contains("no keybroker socket at"), "{provider}: {err}");
        let _ = child.wait();
    }
}

/// The suite can fail: one character changed in the served secret makes moto answer
/// SignatureDoesNotMatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_secret_fails_the_signature_check() {
    for provider in PROVIDERS {
        let e = E2e::start(provider).await;
        let (code, _, err) = e.aws("tampered", &["s3", "ls"]);
        assert_ne!(code, 0, "{provider}: a tampered key must not work");
        assert!(err.contains("SignatureDoesNotMatch"), "{provider}: {err}");
        let (code, _, err) = e.aws("kb", &["s3", "ls"]);
        assert_eq!(code, 0, "{provider}: the untampered key works: {err}");
        e.finish();
    }
}

/// CoreWeave Workload Identity: keys exchanged for an OIDC token file, or a SAML assertion
/// file, work for aws-cli and boto3 against the signature-checking S3. The exchange carries no
/// `Authorization` header (the token in the body is the credential), the key belongs to the
/// token's principal, status shows the auth mode and that principal (never the token), and a
/// stop revokes every key with the profile's API token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_identity_keys_work_for_aws_cli_and_boto3() {
    for (mode, principal) in [
        (
            "coreweave-oidc",
            format!("role/{WIF_ISSUER}:system:serviceaccount:ml:trainer"),
        ),
        ("coreweave-saml", "saml/trainer".to_string()),
    ] {
        let e = E2e::start(mode).await;
        let (code, _, err) = e.aws("kb", &["s3", "mb", "s3://kb-wif"]);
        assert_eq!(code, 0, "{mode}: mb: {err}");
        let (code, _, err) = e.aws("kb", &["s3", "ls", "s3://kb-wif"]);
        assert_eq!(code, 0, "{mode}: ls: {err}");
        let result = e.s3_calls("profile", "kb-wif-calls", 20, &[]);
        assert_eq!(result["ok"], true, "{mode}: {result}");
        assert!(e.fake.calls("exchange") >= 1, "{mode}: minted by exchange");
        assert_eq!(e.fake.calls("exchange_with_authorization"), 0, "{mode}");
        assert_eq!(e.fake.calls("unauthorized"), 0, "{mode}");
        let live = e.fake.live();
        assert!(
            !live.is_empty()
                && live
                    .iter()
                    .all(|k| k.principal.as_deref() == Some(principal.as_str())),
            "{mode}: {live:?}"
        );
        let (code, out, err) = e.env.run(&[
            "status",
            "--json",
            "--socket",
            e.daemon.socket.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{mode}: {err}");
        let status: keybroker::api::StatusAnswer = serde_json::from_str(&out).unwrap();
        let p = &status.profiles[0];
        assert_eq!(
            p.auth.as_deref(),
            Some(&mode["coreweave-".len()..]),
            "{out}"
        );
        assert_eq!(
            p.slot.principal.as_deref(),
            Some(principal.as_str()),
            "{out}"
        );
        let identity = std::fs::read_to_string(e.env.path(if mode == "coreweave-oidc" {
            "p-oidc-token"
        } else {
            "p-saml"
        }))
        .unwrap();
        assert!(
            !out.contains(identity.trim()),
            "{mode}: status shows no token"
        );
        assert!(
            !e.daemon.logs().contains(identity.trim()),
            "{mode}: the log shows no token"
        );
        e.finish();
    }
}
