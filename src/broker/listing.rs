//! Reading a provider's key listing: a key is recognised by the tag the broker created it with
//! (`<tag prefix><lease>`), never by anything else.

use crate::provider::ListedKey;

/// The key carrying `tag`, if the listing has one: how a create whose answer was lost finds
/// its key.
pub fn find_tagged<'a>(listed: &'a [ListedKey], tag: &str) -> Option<&'a ListedKey> {
    listed.iter().find(|k| k.tag.as_deref() == Some(tag))
}

/// The lease of a key whose tag starts with `prefix` (one broker instance's keys), `None` for
/// keys that broker did not make.
pub fn lease_of<'a>(key: &'a ListedKey, prefix: &str) -> Option<&'a str> {
    key.tag.as_deref()?.strip_prefix(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::KeyHandle;

    fn key(id: &str, tag: Option<&str>) -> ListedKey {
        ListedKey {
            handle: KeyHandle {
                access_key_id: id.into(),
                revoke_handle: id.into(),
            },
            tag: tag.map(Into::into),
            created_at: None,
            expires_at: None,
        }
    }

    #[test]
    fn a_key_is_found_by_its_whole_tag_only() {
        let listed = [
            key("a", None),
            key("b", Some("keybroker-h-1-00ff")),
            key("c", Some("keybroker-h-1-00ff0")),
        ];
        assert_eq!(
            find_tagged(&listed, "keybroker-h-1-00ff").map(|k| k.handle.access_key_id.as_str()),
            Some("b")
        );
        assert!(find_tagged(&listed, "keybroker-h-1-00f").is_none());
    }

    #[test]
    fn only_keys_with_the_prefix_have_a_lease() {
        let ours = key("b", Some("keybroker-h-1-00ff"));
        assert_eq!(lease_of(&ours, "keybroker-h-1-"), Some("00ff"));
        assert_eq!(lease_of(&ours, "keybroker-h-2-"), None);
        assert_eq!(lease_of(&key("a", None), "keybroker-h-1-"), None);
    }
}
