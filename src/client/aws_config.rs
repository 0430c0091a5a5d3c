//! `keybroker aws-config`: one `[profile NAME]` block per profile, and `--write`, which merges
//! them into an AWS config file. A block starts and ends with a marker line naming its
//! profile; a later `--write` replaces only what lies between its markers and leaves every
//! other byte of the file as it was.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::api::ClientProfile;

/// The first line of a block keybroker wrote, followed by the AWS profile's name.
const BEGIN: &str = "# >>> keybroker aws-config: profile ";
/// Its last line, followed by the same name.
const END: &str = "# <<< keybroker aws-config: profile ";

/// `keybroker aws-config`: the blocks of the `wanted` profiles (every readable one when
/// empty), named `prefix` + profile; printed, or with `write` (`Some(--file)`) merged into the
/// AWS config file. Returns what to print.
pub fn run(
    socket: &Path,
    wanted: &[String],
    prefix: &str,
    write: Option<Option<&Path>>,
) -> Result<String, String> {
    let profiles = super::profiles(socket)?;
    let mut chosen = Vec::new();
    for name in wanted {
        match profiles.iter().find(|p| &p.name == name) {
            Some(p) => chosen.push(p),
            None => return Err(format!("profile {name}: unknown, or not readable by you (uid {}); the daemon's profiles you may read: {}", rustix::process::getuid().as_raw(), names(&profiles))),
        }
    }
    if wanted.is_empty() {
        chosen = profiles.iter().collect();
    }
    if chosen.is_empty() {
        return Err(format!(
            "the daemon at {} has no profile you (uid {}) may read",
            socket.display(),
            rustix::process::getuid().as_raw()
        ));
    }
    let exe = std::env::current_exe().map_err(|e| format!("finding this binary: {e}"))?;
    let helper = Helper::new(&exe, socket);
    let mut blocks = Vec::new();
    for p in chosen {
        let name = format!("{prefix}{}", p.name);
        if !crate::paths::valid_profile_name(&name) {
            return Err(format!("--prefix {prefix:?} makes the AWS profile name {name:?}; use letters, digits, '_', '.' and '-'"));
        }
        let text = block(p, &name, &helper);
        blocks.push((name, text));
    }
    let Some(file) = write else {
        let texts: Vec<&str> = blocks.iter().map(|(_, b)| b.as_str()).collect();
        return Ok(texts.join("\n"));
    };
    let path = config_path(file)?;
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    let (merged, changes) = merge(&text, &blocks)
        .map_err(|why| format!("{}: {why}; nothing was changed", path.display()))?;
    if merged != text {
        write_atomically(&path, &merged)?;
    }
    let mut out = String::new();
    for ((name, _), change) in blocks.iter().zip(changes) {
        let what = match change {
            Change::Added => "added",
            Change::Updated => "updated",
            Change::Unchanged => "unchanged",
        };
        out += &format!("{}: {what} profile {name}\n", path.display());
    }
    Ok(out)
}

fn names(profiles: &[ClientProfile]) -> String {
    if profiles.is_empty() {
        return "none".into();
    }
    let names: Vec<&str> = profiles.iter().map(|p| p.name.as_str()).collect();
    names.join(", ")
}

/// How a block's `credential_process` reaches the daemon.
pub struct Helper<'a> {
    /// This binary, absolute.
    pub exe: &'a Path,
    /// `--socket`, when the daemon's socket is not the one the helper finds by itself.
    pub socket: Option<&'a Path>,
}

impl<'a> Helper<'a> {
    /// `exe` reaching the daemon at `socket`, naming it only when the helper would not find
    /// it by itself.
    pub fn new(exe: &'a Path, socket: &'a Path) -> Self {
        let implicit = crate::paths::implicit_client_socket();
        Helper {
            exe,
            socket: (socket != implicit).then_some(socket),
        }
    }
}

/// The block for `profile`, named `aws_name` in the AWS config.
pub fn block(profile: &ClientProfile, aws_name: &str, helper: &Helper<'_>) -> String {
    let mut out = format!("{BEGIN}{aws_name}\n");
    let header = if aws_name == "default" {
        "[default]".to_string()
    } else {
        format!("[profile {aws_name}]")
    };
    let mut command = format!(
        "{} credential-process --profile {}",
        shell_word(&helper.exe.to_string_lossy()),
        profile.name
    );
    if let Some(socket) = helper.socket {
        command += &format!(" --socket {}", shell_word(&socket.to_string_lossy()));
    }
    out += &format!("{header}\n# Keys from the keybroker daemon, profile {} ({}): fetched when needed, renewed by the daemon.\ncredential_process = {command}\n", profile.name, profile.provider);
    let s3 = &profile.s3;
    if s3.endpoint.is_some() {
        out += &format!("# S3 requests go to the endpoint in [services {aws_name}]; other services keep theirs.\nservices = {aws_name}\n");
    }
    if let Some(region) = &s3.region {
        out += &format!("# The region requests are signed for.\nregion = {region}\n");
    }
    match s3.addressing_style.as_deref() {
        Some("virtual") => out += "# Bucket names in the host name: the store needs it, and SDKs pick path style for a custom endpoint.\ns3 =\n    addressing_style = virtual\n",
        Some(style) => out += &format!("# Bucket names in the URL path.\ns3 =\n    addressing_style = {style}\n"),
        None => {}
    }
    if s3.checksums_when_required {
        out += "# Checksums only where an operation needs them: the store may refuse those SDKs send by default.\nrequest_checksum_calculation = when_required\nresponse_checksum_validation = when_required\n";
    }
    for missing in &s3.missing {
        out += &format!(
            "# No {}: add {} to [profiles.{}] in keybroker.toml, then run keybroker aws-config again.\n",
            missing.setting, missing.add, profile.name
        );
    }
    if let Some(endpoint) = &s3.endpoint {
        out += &format!("\n[services {aws_name}]\ns3 =\n    endpoint_url = {endpoint}\n");
    }
    out + &format!("{END}{aws_name}\n")
}

/// A shell word for `credential_process`, which the SDKs split like a POSIX shell: as it is
/// when plain, else single-quoted.
fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._+:=@%,-".contains(&b));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// What `--write` did to one profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Its block was appended.
    Added,
    /// Its block was replaced by a different one.
    Updated,
    /// Its block was already there, as it is.
    Unchanged,
}

/// A block keybroker wrote earlier: its name and its byte range, end marker included.
struct Written {
    name: String,
    range: std::ops::Range<usize>,
}

/// `text` with `blocks` (AWS name, block) merged in, and what happened to each; or why nothing
/// may be written: a block that does not end, or a profile or services section of one of
/// those names that keybroker did not write.
pub fn merge(text: &str, blocks: &[(String, String)]) -> Result<(String, Vec<Change>), String> {
    let (written, foreign) = scan(text)?;
    let clashes: Vec<String> = blocks
        .iter()
        .flat_map(|(name, _)| {
            foreign.iter().filter_map(move |(kind, n)| {
                let ours = matches!(kind.as_str(), "profile" | "services")
                    || (kind.is_empty() && name == "default");
                (ours && n == name).then(|| format!("[{kind} {name}]").replace("[ ", "["))
            })
        })
        .collect();
    if !clashes.is_empty() {
        return Err(format!(
            "it has {} that keybroker did not write; rename or remove them, or choose other names with --prefix",
            clashes.join(", ")
        ));
    }
    let mut out = text.to_string();
    let mut changes = Vec::new();
    let mut appended = String::new();
    // Replaced from the end, so earlier ranges stay valid.
    let mut replacements: Vec<(std::ops::Range<usize>, &str)> = Vec::new();
    for (name, block) in blocks {
        match written.iter().find(|w| &w.name == name) {
            Some(w) if &text[w.range.clone()] == block.as_str() => changes.push(Change::Unchanged),
            Some(w) => {
                replacements.push((w.range.clone(), block));
                changes.push(Change::Updated);
            }
            None => {
                appended += "\n";
                appended += block;
                changes.push(Change::Added);
            }
        }
    }
    replacements.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    for (range, block) in replacements {
        out.replace_range(range, block);
    }
    if !appended.is_empty() {
        if out.is_empty() {
            appended.remove(0);
        } else if !out.ends_with('\n') {
            out.push('\n');
        }
        out += &appended;
    }
    Ok((out, changes))
}

/// The blocks keybroker wrote in `text`, and every other section header: (kind, name), kind
/// `profile`, `services`, `sso-session`... or empty for `[NAME]`.
type Sections = (Vec<Written>, Vec<(String, String)>);

fn scan(text: &str) -> Result<Sections, String> {
    let mut written = Vec::new();
    let mut foreign = Vec::new();
    let mut open: Option<(String, usize, usize)> = None;
    let mut at = 0;
    for (number, line) in text.split_inclusive('\n').enumerate() {
        let start = at;
        at += line.len();
        let bare = line.trim_end();
        if let Some((name, begin, first)) = &open {
            if bare.strip_prefix(END) == Some(name.as_str()) {
                written.push(Written {
                    name: name.clone(),
                    range: *begin..at,
                });
                open = None;
            } else if bare.starts_with(BEGIN) {
                return Err(unterminated(name, *first));
            }
            continue;
        }
        if let Some(name) = bare.strip_prefix(BEGIN) {
            open = Some((name.to_string(), start, number + 1));
        } else if let Some(inner) = bare
            .trim_start()
            .strip_prefix('[')
            .and_then(|l| l.strip_suffix(']'))
        {
            let words: Vec<&str> = inner.split_whitespace().collect();
            match words[..] {
                [name] => foreign.push((String::new(), name.to_string())),
                [kind, name] => foreign.push((kind.to_string(), name.to_string())),
                _ => {}
            }
        }
    }
    if let Some((name, _, first)) = open {
        return Err(unterminated(&name, first));
    }
    Ok((written, foreign))
}

/// Why a block keybroker wrote cannot be replaced: its end line is gone.
fn unterminated(name: &str, first: usize) -> String {
    format!("the keybroker block for {name} that starts on line {first} has no end line ({END}{name}); fix it by hand")
}

/// The AWS config file: `--file`, else `$AWS_CONFIG_FILE`, else `~/.aws/config`.
pub fn config_path(flag: Option<&Path>) -> Result<PathBuf, String> {
    match flag {
        Some(path) => Ok(path.to_path_buf()),
        None => aws_file("AWS_CONFIG_FILE", ".aws/config").ok_or_else(|| {
            "HOME is not set, so there is no ~/.aws/config; name the file with --file".into()
        }),
    }
}

/// An AWS file as the SDKs find it: `$VAR`, else `rel` in the home directory; `None` without
/// either.
pub fn aws_file(var: &str, rel: &str) -> Option<PathBuf> {
    let set = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    set(var)
        .map(PathBuf::from)
        .or_else(|| set("HOME").map(|home| PathBuf::from(home).join(rel)))
}

/// Replaces `path` with `text`: written beside it and renamed over it, keeping its mode (0600
/// for a new file). A symbolic link is kept and its target replaced.
pub fn write_atomically(path: &Path, text: &str) -> Result<(), String> {
    let target = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let shown = target.display();
    let mode = match std::fs::metadata(&target) {
        Ok(meta) => meta.permissions().mode() & 0o7777,
        Err(_) => {
            if let Some(dir) = target.parent().filter(|d| !d.exists()) {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            }
            0o600
        }
    };
    crate::files::replace(&target, text.as_bytes(), mode)
        .map_err(|e| format!("writing {shown}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{MissingSetting, S3Settings};

    fn profile(name: &str, s3: S3Settings) -> ClientProfile {
        ClientProfile {
            name: name.into(),
            provider: "coreweave".into(),
            s3,
            container: None,
        }
    }

    fn helper() -> Helper<'static> {
        Helper {
            exe: Path::new("/usr/bin/keybroker"),
            socket: None,
        }
    }

    #[test]
    fn a_block_names_the_helper_and_each_setting() {
        let s3 = S3Settings {
            endpoint: Some("https://cwobject.com".into()),
            addressing_style: Some("virtual".into()),
            missing: vec![MissingSetting {
                setting: "region".into(),
                add: "s3_region = \"US-EAST-04A\"".into(),
            }],
            ..S3Settings::default()
        };
        let text = block(&profile("training", s3), "kb-training", &helper());
        assert!(
            text.starts_with(
                "# >>> keybroker aws-config: profile kb-training\n[profile kb-training]\n"
            ),
            "{text}"
        );
        assert!(text.contains(
            "\ncredential_process = /usr/bin/keybroker credential-process --profile training\n"
        ));
        assert!(text.contains("\nservices = kb-training\n"));
        assert!(text.contains("\ns3 =\n    addressing_style = virtual\n"));
        assert!(
            text.contains("\n# No region: add s3_region = \"US-EAST-04A\" to [profiles.training]")
        );
        assert!(text.ends_with("[services kb-training]\ns3 =\n    endpoint_url = https://cwobject.com\n# <<< keybroker aws-config: profile kb-training\n"), "{text}");
        let odd = Helper {
            exe: Path::new("/opt/my tools/keybroker"),
            socket: Some(Path::new("/run/it's/kb.sock")),
        };
        let text = block(&profile("p", S3Settings::default()), "default", &odd);
        assert!(text.contains("[default]\n"));
        assert!(text.contains(
            "credential_process = '/opt/my tools/keybroker' credential-process --profile p --socket '/run/it'\\''s/kb.sock'\n"
        ), "{text}");
    }

    #[test]
    fn merging_touches_only_its_own_blocks() {
        let a = block(&profile("a", S3Settings::default()), "kb-a", &helper());
        let b = block(&profile("b", S3Settings::default()), "kb-b", &helper());
        let mine = "; my settings\n[profile work]\nregion = eu-west-1\n# trailing comment";
        let blocks = vec![("kb-a".to_string(), a.clone()), ("kb-b".to_string(), b)];
        let (once, changes) = merge(mine, &blocks).unwrap();
        assert!(
            once.starts_with(&format!("{mine}\n\n{a}\n# >>> ")),
            "{once}"
        );
        assert_eq!(changes, [Change::Added, Change::Added]);
        let (twice, changes) = merge(&once, &blocks).unwrap();
        assert_eq!(twice, once);
        assert_eq!(changes, [Change::Unchanged, Change::Unchanged]);
        // A changed block is replaced where it is.
        let a2 = a.replace("--profile a", "--profile a2");
        let (third, changes) = merge(&once, &[("kb-a".to_string(), a2.clone())]).unwrap();
        assert_eq!(third, once.replace(&a, &a2));
        assert_eq!(changes, [Change::Updated]);
        assert_eq!(merge("", &blocks[..1]).unwrap().0, a);
    }

    #[test]
    fn foreign_sections_and_broken_blocks_stop_the_merge() {
        let a = block(&profile("a", S3Settings::default()), "kb-a", &helper());
        let blocks = [("kb-a".to_string(), a)];
        let err = merge("[profile kb-a]\nregion = x\n", &blocks).unwrap_err();
        assert!(
            err.starts_with("it has [profile kb-a] that keybroker did not write"),
            "{err}"
        );
        let err = merge("[services kb-a]\n", &blocks).unwrap_err();
        assert!(err.contains("[services kb-a]"), "{err}");
        let err = merge(
            "x\n# >>> keybroker aws-config: profile kb-a\n[profile kb-a]\n",
            &blocks,
        )
        .unwrap_err();
        assert!(err.contains("starts on line 2 has no end line"), "{err}");
        let dflt = block(&profile("a", S3Settings::default()), "default", &helper());
        let err = merge("[default]\n", &[("default".into(), dflt)]).unwrap_err();
        assert!(err.contains("[default]"), "{err}");
    }
}
