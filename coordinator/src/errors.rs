//! Errors as users read them: sentences, bounded in length. kube's `Display` of an API error ends
//! with the whole Debug dump of the Status; users get the API server's message instead.

/// Longest error text kept for one status item.
pub const ITEM_ERROR_MAX: usize = 512;
/// Longest message of a condition (it lists failed items; each is bounded again).
pub const CONDITION_MESSAGE_MAX: usize = 4096;
/// Longest Event message (the events API keeps at most 1 KiB of a note).
pub const EVENT_MESSAGE_MAX: usize = 1000;
/// Longest command line shown in a status item (an annotation may hold 256 KiB; the pod has it all).
pub const COMMAND_SHOWN_MAX: usize = 256;

pub use stowage_common::kube_errors::sentence;

/// `text` cut at a character boundary to at most `max` bytes, saying how much was left out.
pub fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let note = format!(" … (cut from {} bytes)", text.len());
    let mut cut = max.saturating_sub(note.len());
    while cut > 0 && !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{note}", &text[..cut])
}

/// Items joined with "; " within `max` bytes: as many whole items as fit, then "and N more".
pub fn joined_within(items: &[String], max: usize) -> String {
    let mut out = String::new();
    for (i, item) in items.iter().enumerate() {
        let sep = if out.is_empty() { "" } else { "; " };
        let rest = items.len() - i;
        let tail = format!("; and {rest} more");
        if out.len() + sep.len() + item.len() + tail.len() > max {
            if out.is_empty() {
                return bounded(item, max);
            }
            out.push_str(&tail);
            return out;
        }
        out.push_str(sep);
        out.push_str(item);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_read_as_sentences() {
        let e = kube::Error::Api(
            kube::core::Status::failure(
                "metadata.labels: must be no more than 63 characters",
                "Invalid",
            )
            .with_code(422)
            .boxed(),
        );
        let s = sentence(&e);
        assert_eq!(
            s,
            "the Kubernetes API server refused the request (422 Invalid): metadata.labels: must be no more than 63 characters"
        );
        assert!(!s.contains("Status {"));
    }

    #[test]
    fn texts_are_bounded() {
        let long = "é".repeat(5000);
        let b = bounded(&long, ITEM_ERROR_MAX);
        assert!(b.len() <= ITEM_ERROR_MAX, "{}", b.len());
        assert!(b.ends_with("(cut from 10000 bytes)"));
        assert_eq!(bounded("short", 10), "short");
        let items: Vec<String> = (0..1000)
            .map(|i| format!("ns/pvc-{i}: {}", "x".repeat(500)))
            .collect();
        let j = joined_within(&items, CONDITION_MESSAGE_MAX);
        assert!(j.len() <= CONDITION_MESSAGE_MAX, "{}", j.len());
        assert!(j.ends_with("more"), "{j}");
    }
}
