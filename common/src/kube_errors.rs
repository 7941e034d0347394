//! Kubernetes API errors as sentences for users (never the client's Debug dump of a Status).

/// A Kubernetes API error as a sentence: "the API server refused it (422 Invalid): <message>".
pub fn sentence(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => {
            let what = if s.reason.is_empty() {
                String::new()
            } else {
                format!(" {}", s.reason)
            };
            format!(
                "the Kubernetes API server refused the request ({}{what}): {}",
                s.code, s.message
            )
        }
        other => format!("the Kubernetes API could not be reached: {other}"),
    }
}
