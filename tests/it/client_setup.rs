//! Client setup in one command: `keybroker aws-config` (printed, and merged into a config file
//! with `--write`) and `keybroker exec`, each used by aws-cli against moto's S3, which checks
//! every signature. No test here has a `~/.aws/config` of its own.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::Arc;

use serde_json::Value;

use crate::fake_cloud::{stop_leaving_no_key, FakeCloud};
use crate::harness::{python, venv_bin, Daemon, Env};
use crate::moto::Moto;

/// A daemon serving CoreWeave profile `p` from the fake cloud mirrored into moto, with the
/// container endpoint when `container`, and `s3_settings` in the profile.
struct Setup {
    env: Env,
    fake: Arc<FakeCloud>,
    moto: Option<Arc<Moto>>,
    daemon: Daemon,
}

impl Setup {
    async fn start(with_moto: bool, container: bool, s3_settings: &str) -> Setup {
        let moto = with_moto.then(|| Arc::new(tokio::task::block_in_place(Moto::start)));
        let fake = match &moto {
            Some(m) => FakeCloud::mirrored(Arc::clone(m)),
            None => FakeCloud::new(keybroker::clock::Clock::System),
        };
        let url = fake.serve().await;
        let env = Env::new();
        let server = if container {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            format!("[server.container]\nlisten = \"127.0.0.1:{port}\"\n\n")
        } else {
            String::new()
        };
        let s3 = s3_settings.replace("MOTO", moto.as_ref().map_or("", |m| m.endpoint.as_str()));
        let config = env.config(&format!(
            "{server}{}",
            fake.profile_toml("coreweave", "p", &url, &env, &s3)
        ));
        let daemon = tokio::task::block_in_place(|| env.serve(&config, "info"));
        Setup {
            env,
            fake,
            moto,
            daemon,
        }
    }

    /// A command in a clean environment: the virtualenv's aws on PATH, a HOME with no `.aws`.
    fn clean(&self, program: &str) -> Command {
        let mut c = self.env.program(program, &[]);
        c.env("PATH", format!("{}:/usr/bin:/bin", venv_bin().display()))
            .env("AWS_EC2_METADATA_DISABLED", "true");
        c
    }

    /// Stops the daemon: exit 0, and no key the broker minted is alive.
    fn finish(mut self) {
        stop_leaving_no_key(&mut self.daemon, &self.fake);
        drop(self.moto);
    }
}

fn outcome(out: std::process::Output) -> (i32, String, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What botocore makes of an AWS config file's profile: the S3 client's endpoint and
/// addressing style, and the credential_process line.
const BOTOCORE: &str = r#"
import configparser, json, sys
import botocore.session
path, profile = sys.argv[1], sys.argv[2]
configparser.RawConfigParser().read(path)  # what aws-cli's loader builds on
session = botocore.session.Session(profile=profile)
client = session.create_client("s3")
print(json.dumps({
    "endpoint": client.meta.endpoint_url,
    "addressing": (client.meta.config.s3 or {}).get("addressing_style"),
    "process": session.get_scoped_config().get("credential_process"),
}))
"#;

/// A CoreWeave profile without S3 settings gets CoreWeave's endpoint and virtual-hosted
/// addressing, which botocore reads from the block as printed; the missing region is named
/// with the line to add; no secret is printed; an unknown profile is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_config_gives_coreweave_its_endpoint_and_virtual_addressing() {
    let s = Setup::start(false, false, "").await;
    let (code, block, err) = s.env.run(&["aws-config", "p"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        block.contains(
            "# No region: add s3_region = \"US-EAST-04A\" (your availability zone) to [profiles.p]"
        ),
        "{block}"
    );
    assert!(!block.contains(s.fake.token()), "a secret was printed");
    let file = s.env.path("printed-config");
    std::fs::write(&file, &block).unwrap();
    let out = s
        .clean(python().to_str().unwrap())
        .args(["-c", BOTOCORE, file.to_str().unwrap(), "keybroker-p"])
        .env("AWS_CONFIG_FILE", &file)
        .output()
        .unwrap();
    let (code, stdout, stderr) = outcome(out);
    assert_eq!(code, 0, "{stderr}");
    let seen: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(seen["endpoint"], "https://cwobject.com", "{seen}");
    assert_eq!(seen["addressing"], "virtual", "{seen}");
    let process = seen["process"].as_str().unwrap();
    assert!(
        process.ends_with(&format!(
            "credential-process --profile p --socket {}",
            s.daemon.socket.display()
        )),
        "{process}"
    );

    let (code, _, err) = s.env.run(&["aws-config", "p", "nope"]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("keybroker: profile nope: unknown, or not readable by you"),
        "{err}"
    );
    s.finish();
}

/// `--write` adds its block after the file's own bytes, which stay as they were; a second run
/// changes nothing; aws-cli with the file and no other setting reaches the signature-checking
/// S3 through the profile's `s3_endpoint`. A profile of the same name that keybroker did not
/// write makes it exit 1 and leaves that file alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_config_write_merges_and_aws_cli_reaches_s3() {
    let s = Setup::start(
        true,
        false,
        "s3_endpoint = \"MOTO\"\ns3_region = \"us-east-1\"\ns3_addressing_style = \"path\"\n",
    )
    .await;
    let file = s.env.path("aws/config");
    std::fs::create_dir(s.env.path("aws")).unwrap();
    let mine = "# my settings\n[default]\nregion = eu-north-1\n\n[profile work] ; team\noutput = json\ns3 =\n  max_concurrent_requests = 4";
    std::fs::write(&file, mine).unwrap();
    let write = ["aws-config", "--write", "--file", file.to_str().unwrap()];
    let (code, out, err) = s.env.run(&write);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!("{}: added profile keybroker-p\n", file.display())
    );
    let once = std::fs::read_to_string(&file).unwrap();
    assert!(
        once.starts_with(&format!("{mine}\n\n# >>> keybroker")),
        "{once}"
    );
    let (code, out, _) = s.env.run(&write);
    assert_eq!(code, 0);
    assert_eq!(
        out,
        format!("{}: unchanged profile keybroker-p\n", file.display())
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), once);

    let aws = |args: &[&str]| {
        let out = s
            .clean("aws")
            .args(["--profile", "keybroker-p"])
            .args(args)
            .env("AWS_CONFIG_FILE", &file)
            .output()
            .unwrap();
        outcome(out)
    };
    let (code, _, err) = aws(&["s3", "mb", "s3://kb-setup"]);
    assert_eq!(code, 0, "mb: {err}");
    let (code, out, err) = aws(&["s3", "ls"]);
    assert_eq!(code, 0, "ls: {err}");
    assert!(out.contains("kb-setup"), "{out}");

    let theirs = s.env.path("their-config");
    let text = "[profile keybroker-p]\nregion = us-west-2\n";
    std::fs::write(&theirs, text).unwrap();
    let (code, _, err) = s
        .env
        .run(&["aws-config", "--write", "--file", theirs.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("it has [profile keybroker-p] that keybroker did not write")
            && err.contains("nothing was changed"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&theirs).unwrap(), text);

    // A new file, in a directory that does not exist yet, is private.
    let fresh = s.env.path("new/.aws/config");
    let (code, out, err) = s
        .env
        .run(&["aws-config", "--write", "--file", fresh.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("added profile keybroker-p\n"), "{out}");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&fresh), 0o600);
    assert_eq!(mode(fresh.parent().unwrap()), 0o700);
    s.finish();
}

/// `exec` with no AWS config file: through the container endpoint when the daemon serves it
/// (and nothing of the caller's AWS_PROFILE or stale keys reaches the command), through keys in
/// the environment when not, with a warning that they end. The command's exit status is
/// exec's; a missing command is 127; an exec inside an exec is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_aws_cli_with_the_profile_and_nothing_else() {
    let s3 = "s3_endpoint = \"MOTO\"\ns3_region = \"us-east-1\"\n";
    for container in [true, false] {
        let s = Setup::start(true, container, s3).await;
        let exec = |script: &str| {
            let out = s
                .clean(crate::harness::BIN)
                .args(["exec", "--profile", "p", "--", "sh", "-c", script])
                .env("AWS_PROFILE", "ghost")
                .env("AWS_ACCESS_KEY_ID", "AKIASTALE")
                .output()
                .unwrap();
            outcome(out)
        };
        let check = if container {
            r#"test -n "$AWS_CONTAINER_CREDENTIALS_FULL_URI" && test -z "${AWS_ACCESS_KEY_ID-}""#
        } else {
            r#"test -n "$AWS_ACCESS_KEY_ID" && test "$AWS_ACCESS_KEY_ID" != AKIASTALE && test -n "$AWS_CREDENTIAL_EXPIRATION""#
        };
        let script = format!(
            r#"{check} && test -z "${{AWS_PROFILE-}}" && test "$KEYBROKER_EXEC" = p && aws s3 mb s3://kb-exec && aws s3 ls"#
        );
        let (code, out, err) = exec(&script);
        assert_eq!(code, 0, "container {container}: {out} {err}");
        assert!(out.contains("kb-exec"), "{out}");
        assert_eq!(
            err.contains("key is in the environment until"),
            !container,
            "{err}"
        );
        assert_eq!(exec("exit 7").0, 7);
        let missing = s
            .clean(crate::harness::BIN)
            .args(["exec", "--profile", "p", "--", "keybroker-no-such-command"])
            .output()
            .unwrap();
        let (code, _, err) = outcome(missing);
        assert_eq!(code, 127, "{err}");
        assert!(
            err.contains("keybroker exec: keybroker-no-such-command: command not found"),
            "{err}"
        );
        let not_runnable = s.env.path("not-runnable");
        std::fs::write(&not_runnable, "#!/bin/sh\n").unwrap();
        let out = s
            .clean(crate::harness::BIN)
            .args(["exec", "--profile", "p", "--"])
            .arg(&not_runnable)
            .output()
            .unwrap();
        let (code, _, err) = outcome(out);
        assert_eq!(code, 126, "{err}");
        assert!(err.contains("cannot run it"), "{err}");
        let nested = format!("{} exec --profile p -- true", crate::harness::BIN);
        let (code, _, err) = exec(&nested);
        assert_eq!(code, 125, "{err}");
        assert!(
            err.contains("keybroker exec: refusing to nest: this shell already runs inside keybroker exec --profile p"),
            "{err}"
        );
        s.finish();
    }
}
