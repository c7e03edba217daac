//! Version pinning (pure): whether the engine image and the model a service serves are fixed,
//! so that a reschedule or a new replica serves exactly what the others serve.
//!
//! - An image is pinned by a digest (`image@sha256:<hex>`); a tag can be moved.
//! - A model URI is pinned by a digest (`@sha256:<hex>`), a revision (`@<commit>`, 7–64 hex
//!   digits, as Hugging Face repositories have), a version in the query (`revision=`,
//!   `version=`, `versionId=`, as object stores keep them) or a generation (`#<number>`, as
//!   Google Cloud Storage keeps it). Without `model.uri` the engine resolves the model by name,
//!   which pins nothing.

use super::{EngineSpec, ModelSpec};

/// Why a service is not pinned; empty when it is.
pub fn unpinned(engine: &EngineSpec, model: &ModelSpec) -> Vec<String> {
    let mut why = Vec::new();
    if !image_pinned(&engine.image) {
        why.push(format!(
            "engine.image {:?} has no digest (pin it as image@sha256:<digest>)",
            engine.image
        ));
    }
    match &model.uri {
        None => why.push(
            "model.uri is not set: the engine resolves the model by name (set it with a revision, version or digest)"
                .to_string(),
        ),
        Some(u) if !uri_pinned(u) => why.push(format!(
            "model.uri {u:?} has no revision, version or digest (e.g. hf://org/model@<commit>, s3://bucket/model?versionId=<id>)"
        )),
        Some(_) => {}
    }
    why
}

pub fn image_pinned(image: &str) -> bool {
    image
        .rsplit_once("@sha256:")
        .is_some_and(|(_, d)| d.len() == 64 && hex(d))
}

pub fn uri_pinned(uri: &str) -> bool {
    let (rest, fragment) = uri.split_once('#').unwrap_or((uri, ""));
    if !fragment.is_empty() && fragment.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let versioned = query.split('&').any(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        !v.is_empty() && matches!(k, "revision" | "version" | "versionId")
    });
    if versioned {
        return true;
    }
    // The last path segment's `@…`: a digest or a commit.
    let last = path.rsplit('/').next().unwrap_or(path);
    match last.rsplit_once('@') {
        Some((_, d)) => match d.strip_prefix("sha256:") {
            Some(digest) => digest.len() == 64 && hex(digest),
            None => (7..=64).contains(&d.len()) && hex(d),
        },
        None => false,
    }
}

fn hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn images_are_pinned_by_digest_only() {
        assert!(image_pinned(&format!(
            "registry.internal/vllm@sha256:{DIGEST}"
        )));
        assert!(image_pinned(&format!(
            "registry.internal:5000/vllm:0.6.3@sha256:{DIGEST}"
        )));
        for not in [
            "registry.internal/vllm:0.6.3",
            "vllm/vllm-openai",
            "registry.internal/vllm@sha256:abc",
            "registry.internal/vllm@sha256:",
        ] {
            assert!(!image_pinned(not), "{not}");
        }
    }

    #[test]
    fn model_uris_are_pinned_by_revision_version_digest_or_generation() {
        for pinned in [
            "hf://meta-llama/Llama-3.1-8B-Instruct@0e9e39f249a16976918f6564b8830bc894c89659",
            "hf://org/model@0e9e39f",
            "s3://models/llama/8b?versionId=3HL4kqtJlcpXroDTDmJ",
            "https://models.internal/llama.tar?revision=7",
            "gs://models/llama-8b.tar#1700000000000000",
            &format!("oci://registry.internal/models/llama@sha256:{DIGEST}"),
        ] {
            assert!(uri_pinned(pinned), "{pinned}");
        }
        for not in [
            "hf://meta-llama/Llama-3.1-8B-Instruct",
            "hf://org/model@main",
            "s3://models/llama/8b",
            "s3://models/llama/8b?versionId=",
            "gs://models/llama-8b.tar#latest",
            "pvc://models/llama",
            "oci://registry.internal/models/llama:v1",
        ] {
            assert!(!uri_pinned(not), "{not}");
        }
    }
}
