//! Every config mistake gives its own message with line and column, through
//! the real binary, and `serve` exits 64 before binding anything.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::harness::Env;

/// (what, config text, expected line:col, expected message fragment)
fn cases(token: &str) -> Vec<(&'static str, String, &'static str, &'static str)> {
    let cw = |extra: &str| {
        format!("[profiles.train]\nprovider = \"coreweave\"\ntoken_file = \"{token}\"\n{extra}")
    };
    vec![
        (
            "lifetime <= renew_before",
            cw("lifetime = \"1h\"\nrenew_before = \"1h\"\n"),
            "5:16",
            "renew_before (1h) must be less than lifetime (1h)",
        ),
        (
            "renew_before <= min_remaining",
            cw("renew_before = \"20m\"\nmin_remaining = \"25m\"\n"),
            "5:17",
            "min_remaining (25m) must be less than renew_before (20m)",
        ),
        (
            "short min_remaining",
            cw("min_remaining = \"10m\"\n"),
            "4:17",
            "min_remaining (10m) is under 16m",
        ),
        (
            "lifetime above the provider maximum",
            cw("lifetime = \"13h\"\nrenew_before = \"1h\"\n"),
            "4:12",
            "lifetime (13h) exceeds coreweave's maximum of 12h",
        ),
        (
            "zero lifetime",
            cw("lifetime = \"0s\"\n"),
            "4:12",
            "lifetime must be greater than zero",
        ),
        (
            "plain http off loopback",
            cw("endpoint = \"http://api.coreweave.com\"\n"),
            "4:12",
            "plain http to a host that is not loopback",
        ),
        (
            "bad profile name",
            "[profiles.\"my profile\"]\nprovider = \"dev\"\n".to_string(),
            "1:11",
            "profile name \"my profile\" may contain only",
        ),
        (
            "unknown key",
            cw("lifetme = \"1h\"\n"),
            "4:1",
            "unknown key `lifetme`",
        ),
        (
            "bad duration",
            cw("lifetime = \"an hour\"\n"),
            "4:12",
            "lifetime \"an hour\" is not a duration",
        ),
        (
            "unknown provider",
            "[profiles.a]\nprovider = \"s3\"\n".to_string(),
            "2:12",
            "unknown variant `s3`",
        ),
        (
            "missing token_file",
            "[profiles.a]\nprovider = \"coreweave\"\n".to_string(),
            "1:1",
            "provider coreweave needs token_file",
        ),
        (
            "key of another provider",
            "[profiles.a]\nprovider = \"dev\"\ntoken_file = \"/x\"\n".to_string(),
            "3:14",
            "token_file does not apply to provider dev",
        ),
        (
            "bad socket_mode",
            "[server]\nsocket_mode = \"rw\"\n[profiles.a]\nprovider = \"dev\"\n".to_string(),
            "2:15",
            "socket_mode \"rw\" is not an octal file mode",
        ),
        (
            "container listen off loopback",
            "[server.container]\nlisten = \"0.0.0.0:9911\"\n[profiles.a]\nprovider = \"dev\"\n"
                .to_string(),
            "2:10",
            "is not a loopback address",
        ),
        (
            "toml syntax",
            "[profiles.a]\nprovider = dev\n".to_string(),
            "2:12",
            "string values must be quoted",
        ),
        (
            "oidc_token_file without auth = oidc",
            cw("oidc_token_file = \"/run/token\"\n"),
            "4:19",
            "oidc_token_file applies only with auth = \"oidc\", and this profile has auth = \"api-token\"",
        ),
        (
            "oidc without org_id",
            cw("auth = \"oidc\"\noidc_token_file = \"/run/token\"\n"),
            "1:1",
            "needs org_id with auth = \"oidc\"",
        ),
        (
            "oidc without its token file",
            cw("auth = \"oidc\"\norg_id = \"o1\"\n"),
            "1:1",
            "needs oidc_token_file with auth = \"oidc\"",
        ),
        (
            "saml without wif_config_id",
            cw("auth = \"saml\"\norg_id = \"o1\"\nsaml_assertion_file = \"/run/saml\"\n"),
            "1:1",
            "needs wif_config_id with auth = \"saml\"",
        ),
        (
            "saml keys with auth = oidc",
            cw("auth = \"oidc\"\norg_id = \"o1\"\noidc_token_file = \"/run/t\"\nwif_config_id = \"w\"\n"),
            "7:17",
            "wif_config_id applies only with auth = \"saml\", and this profile has auth = \"oidc\"",
        ),
        (
            "org_id with the API token",
            cw("org_id = \"o1\"\n"),
            "4:10",
            "org_id applies only with auth = \"oidc\" or \"saml\"",
        ),
        (
            "empty org_id",
            cw("auth = \"oidc\"\norg_id = \"\"\noidc_token_file = \"/run/t\"\n"),
            "5:10",
            "org_id is empty",
        ),
        (
            "revoke_on_shutdown without a token to revoke with",
            "[profiles.t]\nprovider = \"coreweave\"\nauth = \"oidc\"\norg_id = \"o\"\noidc_token_file = \"/run/t\"\nrevoke_on_shutdown = true\n".to_string(),
            "1:1",
            "revoke_on_shutdown = true needs token_file",
        ),
        (
            "unknown auth",
            cw("auth = \"password\"\n"),
            "4:8",
            "auth \"password\" is not one of \"api-token\", \"oidc\", \"saml\"",
        ),
        (
            "auth on another provider",
            "[profiles.a]\nprovider = \"dev\"\nauth = \"oidc\"\n".to_string(),
            "3:8",
            "auth does not apply to provider dev",
        ),
        (
            "no upstream concurrency",
            format!("[server]\nupstream_concurrency = 0\n{}", cw("")),
            "2:24",
            "upstream_concurrency 0 must be 1 to 1024",
        ),
        (
            "s3_endpoint not a URL",
            cw("s3_endpoint = \"cwobject.com\"\n"),
            "4:15",
            "s3_endpoint \"cwobject.com\" is not a URL like \"https://s3.example.com\" (or \"lota\")",
        ),
        (
            "lota on another provider",
            "[profiles.a]\nprovider = \"dev\"\ns3_endpoint = \"lota\"\n".to_string(),
            "3:15",
            "s3_endpoint \"lota\" is CoreWeave's in-cluster endpoint, not provider dev's",
        ),
        (
            "s3_region with a space",
            cw("s3_region = \"US EAST\"\n"),
            "4:13",
            "s3_region \"US EAST\" must be one word",
        ),
        (
            "unknown addressing style",
            cw("s3_addressing_style = \"auto\"\n"),
            "4:23",
            "s3_addressing_style \"auto\" is not \"virtual\" or \"path\"",
        ),
    ]
}

#[test]
fn each_mistake_has_its_own_located_message() {
    let env = Env::new();
    let token = env.secret_file("token", "secret-token\n");
    let token = token.to_str().unwrap();
    let mut seen = std::collections::HashSet::new();
    for (what, text, at, fragment) in cases(token) {
        let path = env.config(&text);
        let (code, stdout, stderr) = env.run(&["check-config", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 64, "{what}: exit code; stderr: {stderr}");
        assert!(stdout.is_empty(), "{what}: stdout {stdout:?}");
        let prefix = format!("keybroker: config {}:{at}: ", path.display());
        assert!(
            stderr.starts_with(&prefix),
            "{what}: expected {prefix:?}, got {stderr:?}"
        );
        assert!(
            stderr.contains(fragment),
            "{what}: expected {fragment:?} in {stderr:?}"
        );
        assert_eq!(stderr.lines().count(), 1, "{what}: one line: {stderr:?}");
        assert!(!stderr.contains("secret-token"), "{what}: the token leaked");
        assert!(
            seen.insert(
                stderr
                    .split_once(": ")
                    .unwrap()
                    .1
                    .split_once(": ")
                    .unwrap()
                    .1
                    .to_string()
            ),
            "{what}: message not distinct"
        );
    }
}

#[test]
fn secret_files_open_to_others_or_a_foreign_group_are_refused() {
    let env = Env::new();
    let token = env.secret_file("token", "secret-token\n");
    let path = env.config(&format!(
        "[profiles.a]\nprovider = \"coreweave\"\ntoken_file = \"{}\"\n",
        token.display()
    ));
    let check = |mode: u32| {
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(mode)).unwrap();
        env.run(&["check-config", "--config", path.to_str().unwrap()])
    };
    let (code, _, stderr) = check(0o644);
    assert_eq!(code, 64);
    assert!(
        stderr.contains(":3:14: ")
            && stderr.contains("open to others (mode 0644)")
            && stderr.contains("chmod 600"),
        "{stderr}"
    );
    let (code, _, stderr) = check(0o660);
    assert_eq!(code, 64);
    assert!(
        stderr.contains("writable by its group (mode 0660)"),
        "{stderr}"
    );
    // The file's group is the group keybroker runs as (the test made the file), so the group
    // may read it: a Kubernetes Secret given to a pod's fsGroup is read this way.
    let (code, _, stderr) = check(0o440);
    assert_eq!(code, 0, "{stderr}");
    // Without a '/', the name is a systemd credential in $CREDENTIALS_DIRECTORY.
    let path = env.config("[profiles.a]\nprovider = \"coreweave\"\ntoken_file = \"cw-token\"\n");
    let (code, _, stderr) = env.run(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 64);
    assert!(
        stderr.contains("$CREDENTIALS_DIRECTORY is not set"),
        "{stderr}"
    );
    env.secret_file("cw-token", "tok");
    assert_checks_ok_with_credentials_dir(&env, &path);
}

#[test]
fn serve_with_a_bad_config_exits_64_and_binds_nothing() {
    let env = Env::new();
    let path = env.config("[profiles.a]\nprovider = \"dev\"\nlifetime = \"0s\"\n");
    let (code, _, stderr) = env.run(&["serve", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains(":3:12: "), "{stderr}");
    assert!(!env.socket().exists() && !env.socket().parent().unwrap().exists());
    let (code, _, stderr) = env.run(&[
        "serve",
        "--config",
        env.path("missing.toml").to_str().unwrap(),
    ]);
    assert_eq!(code, 64);
    assert!(stderr.contains("cannot read the config file"), "{stderr}");
    let (code, _, _) = env.run(&["serve", "--bogus-flag"]);
    assert_eq!(code, 64);
}

#[test]
fn a_valid_config_checks_ok() {
    let env = Env::new();
    let token = env.secret_file("token", "t");
    let path = env.config(&format!(
        "[server]\nsocket_mode = \"0660\"\nshutdown_timeout = \"5s\"\n[profiles.a]\nprovider = \"coreweave\"\ntoken_file = \"{}\"\nlifetime = \"2h\"\nrenew_before = \"1h\"\nmin_remaining = \"30m\"\nallow_uids = [1000]\n[profiles.b]\nprovider = \"dev\"\n",
        token.display()
    ));
    let (code, stdout, stderr) = env.run(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ok (2 profiles: a, b)"), "{stdout}");
}

/// The example config in the repository is valid once its token file exists.
#[test]
fn the_example_config_is_valid() {
    let env = Env::new();
    env.secret_file("coreweave-token", "t");
    env.secret_file(
        "crusoe-secret",
        "a2V5YnJva2VyLXRlc3Qtc2VjcmV0LTAxMjM0NTY3ODk",
    );
    env.secret_file("glesys-key", "k");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/keybroker.example.toml");
    assert_checks_ok_with_credentials_dir(&env, Path::new(example));
}

/// `check-config` passes with `$CREDENTIALS_DIRECTORY` set to the env's directory.
fn assert_checks_ok_with_credentials_dir(env: &Env, config: &Path) {
    let out = env
        .command(&["check-config", "--config", config.to_str().unwrap()])
        .env("CREDENTIALS_DIRECTORY", env.dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Crusoe and GleSYS profiles: missing keys, a secret that cannot sign, and Crusoe's renewal
/// rule each get their own located message.
#[test]
fn crusoe_and_glesys_mistakes_are_located() {
    let env = Env::new();
    let good = env.secret_file(
        "crusoe-secret",
        "a2V5YnJva2VyLXRlc3Qtc2VjcmV0LTAxMjM0NTY3ODk",
    );
    let padded = env.secret_file("padded-secret", "a2V5+/==");
    let key = env.secret_file("glesys-key", "k");
    let crusoe = |secret: &std::path::Path, extra: &str| {
        format!(
            "[profiles.c]\nprovider = \"crusoe\"\naccess_key_id = \"AK\"\nsecret_key_file = \"{}\"\n{extra}",
            secret.display()
        )
    };
    let cases = [
        (crusoe(&good, "lifetime = \"1h\"\nrenew_before = \"40m\"\n"), "6:16", "renew_before (40m) is more than half of lifetime (1h)"),
        (crusoe(&padded, ""), "4:19", "not unpadded URL-safe base64"),
        ("[profiles.c]\nprovider = \"crusoe\"\n".to_string(), "1:1", "provider crusoe needs access_key_id"),
        (
            format!("[profiles.g]\nprovider = \"glesys\"\nproject = \"CL1\"\napi_key_file = \"{}\"\n", key.display()),
            "1:1",
            "provider glesys needs instance_id",
        ),
        (
            format!("[profiles.g]\nprovider = \"glesys\"\nproject = \"CL1\"\napi_key_file = \"{}\"\ninstance_id = \"os-1\"\norg_id = \"x\"\n", key.display()),
            "6:10",
            "org_id does not apply to provider glesys",
        ),
    ];
    for (text, at, fragment) in cases {
        let path = env.config(&text);
        let (code, _, stderr) = env.run(&["check-config", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 64, "{stderr}");
        assert!(
            stderr.contains(&format!(":{at}: ")) && stderr.contains(fragment),
            "expected {at} {fragment:?}: {stderr}"
        );
    }
    let ok = env.config(&crusoe(
        &good,
        "org_id = \"4f9b1e0c-0000-4000-8000-000000000001\"\n",
    ));
    let (code, _, stderr) = env.run(&["check-config", "--config", ok.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
}

/// Two Crusoe profiles on one API key share its user's two-key budget, which the broker counts
/// per profile: refused, at the later profile's access_key_id, naming both profiles.
#[test]
fn two_crusoe_profiles_may_not_share_an_api_key() {
    let env = Env::new();
    let secret = env.secret_file(
        "crusoe-secret",
        "a2V5YnJva2VyLXRlc3Qtc2VjcmV0LTAxMjM0NTY3ODk",
    );
    let profile = |name: &str, key: &str| {
        format!(
            "[profiles.{name}]\nprovider = \"crusoe\"\naccess_key_id = \"{key}\"\nsecret_key_file = \"{}\"\n",
            secret.display()
        )
    };
    // "zeta" comes first in the file and last by name: the error is at the later table.
    let text = [
        profile("zeta", "CRUSOEKEY1"),
        profile("other", "CRUSOEKEY2"),
        profile("alpha", "CRUSOEKEY1"),
    ]
    .concat();
    let path = env.config(&text);
    for command in ["check-config", "serve"] {
        let (code, stdout, stderr) = env.run(&[command, "--config", path.to_str().unwrap()]);
        assert_eq!(code, 64, "{command}: {stderr}");
        assert!(stdout.is_empty(), "{command}: {stdout:?}");
        let prefix = format!("keybroker: config {}:11:17: ", path.display());
        assert!(stderr.starts_with(&prefix), "{command}: {stderr:?}");
        assert!(
            stderr.contains(
                "profile alpha: access_key_id \"CRUSOEKEY1\" is also used by profile zeta"
            ) && stderr.contains("give each profile its own Crusoe API key"),
            "{command}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{command}: {stderr}");
    }
    let ok = env.config(&[profile("a", "CRUSOEKEY1"), profile("b", "CRUSOEKEY2")].concat());
    let (code, stdout, stderr) = env.run(&["check-config", "--config", ok.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ok (2 profiles: a, b)"), "{stdout}");
}
