//! The `Replace` journal's contents: the target directory and the entries moved aside, hex-encoded
//! one per line. The journal lives in a directory a tenant can write, so parsing trusts nothing: a
//! path that would leave the volume, or a name that is not a plain name, makes it unreadable.

use super::*;

/// One entry to move aside: its directory below the target and its name there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) parent: Vec<String>,
    pub(super) name: Vec<u8>,
}

impl Entry {
    pub(super) fn shown(&self) -> String {
        let mut parts = self.parent.clone();
        parts.push(String::from_utf8_lossy(&self.name).into_owned());
        parts.join("/")
    }
    pub(super) fn encode(&self) -> String {
        let mut raw = self.parent.join("/").into_bytes();
        if !raw.is_empty() {
            raw.push(b'/');
        }
        raw.extend_from_slice(&self.name);
        hex(&raw)
    }
    pub(super) fn decode(s: &str) -> Option<Self> {
        let raw = unhex(s)?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (parent, name) = match raw.iter().rposition(|b| *b == b'/') {
            Some(i) => (
                String::from_utf8(raw[..i].to_vec()).ok()?,
                raw[i + 1..].to_vec(),
            ),
            None => (String::new(), raw),
        };
        // The journal lives in a directory the tenant can write: never trust it beyond the volume.
        let parent = safe_fs::relative_components(&parent).ok()?;
        let name_ok = !name.is_empty() && name != b"." && name != b".." && !name.contains(&0);
        (name_ok && !text.starts_with('/')).then_some(Self { parent, name })
    }
}

pub(super) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(super) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

pub(super) fn parse_journal(text: &str) -> Option<(Vec<String>, Vec<Entry>)> {
    let mut lines = text.lines();
    (lines.next()? == JOURNAL_MAGIC).then_some(())?;
    let target = lines.next()?.strip_prefix("target ")?;
    let target = String::from_utf8(unhex(target)?).ok()?;
    let target_parts = safe_fs::relative_components(&target).ok()?;
    let entries = lines
        .map(|l| Entry::decode(l.strip_prefix("entry ")?))
        .collect::<Option<Vec<_>>>()?;
    Some((target_parts, entries))
}
