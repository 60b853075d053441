//! The shape an image source must have before it reaches `qemu-img` on a storage node: an absolute path
//! without `..`, or an http(s) URL. That keeps out qemu's pseudo-protocols (`json:`, `nbd:`, …) and anything
//! that could read as an option. Checked by the coordinator (so a bad source is refused at once) and again by
//! the storage agent (which trusts no caller). Where a source may point is narrower still: a path must be a file
//! in one of the storage node's `image_dirs`, and only admins may give a URL.

/// Whether the source is an http(s) URL (else it is a path on the storage node).
pub fn is_url(source: &str) -> bool {
    source.starts_with("http://") || source.starts_with("https://")
}

/// Why a source is refused, or `Ok`.
pub fn check(source: &str) -> Result<(), String> {
    let url = is_url(source);
    let path = source.starts_with('/') && !std::path::Path::new(source).components().any(|c| c.as_os_str() == "..");
    if source.len() > 2048 || source.chars().any(char::is_control) || !(url || path) {
        return Err(format!("{source:?} is neither an absolute path nor an http(s) URL"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn sources_are_paths_or_urls_only() {
        assert!(super::check("/srv/images/debian.qcow2").is_ok());
        assert!(super::check("https://example.org/debian.raw").is_ok());
        for bad in ["debian.qcow2", "json:{\"driver\":\"file\"}", "nbd:127.0.0.1:10809", "-f", "/srv/../etc/x", "/x\ny"]
        {
            assert!(super::check(bad).is_err(), "{bad:?}");
        }
    }
}
