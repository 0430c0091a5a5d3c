//! User and group lookups from /etc/passwd and /etc/group, without NSS (no unsafe, no C library
//! calls). Directory users and groups (LDAP, sssd) are not seen: give those by number.

/// The gid of the group named `name` in /etc/group.
pub fn group_by_name(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    gid_in(&text, name)
}

fn gid_in(group_file: &str, name: &str) -> Option<u32> {
    group_file.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then_some(())?;
        fields.nth(1)?.parse().ok()
    })
}

/// Every group of user `uid`: `primary` plus the groups of /etc/group that list the user's
/// name (from /etc/passwd) as a member.
pub fn groups_of(uid: u32, primary: u32) -> Vec<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    groups_in(&passwd, &group, uid, primary)
}

/// The name of user `uid` in /etc/passwd.
pub fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    name_in(&passwd, uid)
}

fn name_in(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() > 3 && f[2].parse::<u32>().ok() == Some(uid)).then(|| f[0].to_string())
    })
}

fn groups_in(passwd: &str, group: &str, uid: u32, primary: u32) -> Vec<u32> {
    let mut gids = vec![primary];
    if let Some(name) = name_in(passwd, uid) {
        for line in group.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() > 3 && f[3].split(',').any(|m| m.trim() == name) {
                if let Ok(gid) = f[2].parse() {
                    gids.push(gid);
                }
            }
        }
    }
    gids
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\nbob:x:1001:1001::/home/bob:/bin/sh\n";
    const GROUP: &str =
        "root:x:0:\nalice:x:1000:\nbob:x:1001:\nml:x:2000:bob,alice\ninfra:x:2001:bob\n";

    #[test]
    fn supplementary_groups_come_from_the_member_lists() {
        assert_eq!(groups_in(PASSWD, GROUP, 1000, 1000), [1000, 2000]);
        assert_eq!(groups_in(PASSWD, GROUP, 1001, 1001), [1001, 2000, 2001]);
        assert_eq!(
            groups_in(PASSWD, GROUP, 4242, 4242),
            [4242],
            "unknown uid: its primary gid only"
        );
    }

    #[test]
    fn user_names_come_from_passwd() {
        assert_eq!(name_in(PASSWD, 1001).as_deref(), Some("bob"));
        assert_eq!(name_in(PASSWD, 4242), None);
    }

    #[test]
    fn group_names_resolve() {
        assert_eq!(gid_in(GROUP, "ml"), Some(2000));
        assert_eq!(gid_in(GROUP, "nope"), None);
    }
}
