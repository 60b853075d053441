//! Small pure checks of request fields. Each returns an error naming the field, before anything changes.

use crate::error::{Error, Result};

/// A display name or description: at most `max` characters, no control characters.
pub fn text(field: &'static str, value: &str, max: usize) -> Result<()> {
    if value.chars().count() > max {
        return Err(Error::invalid(field, format!("must be at most {max} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(())
}

/// A required name: 1–255 characters, no control characters, no leading or trailing white space.
pub fn required_name(field: &'static str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.trim() != value {
        return Err(Error::invalid(field, "must not start or end with white space"));
    }
    text(field, value, 255)
}

/// An extra-spec or metadata key: 1–255 characters of `A-Z a-z 0-9 _ . : -`.
pub fn spec_key(field: &'static str, key: &str) -> Result<()> {
    if key.is_empty() || key.len() > 255 {
        return Err(Error::invalid(field, format!("key {key:?} must be 1-255 characters")));
    }
    if !key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-')) {
        return Err(Error::invalid(field, format!("key {key:?} may only contain A-Z a-z 0-9 _ . : -")));
    }
    Ok(())
}

/// An extra-spec or metadata value: at most 255 characters, no control characters.
pub fn spec_value(field: &'static str, key: &str, value: &str) -> Result<()> {
    text(field, value, 255).map_err(|_| {
        Error::invalid(field, format!("value of {key:?} must be at most 255 characters without control characters"))
    })
}

/// A UUID in its canonical hyphenated lowercase form.
pub fn uuid(field: &'static str, value: &str) -> Result<()> {
    match ember_common::identity::canonical_uuid(value) {
        Some(_) => Ok(()),
        None => Err(Error::invalid(field, format!("{value:?} is not a valid id (a lowercase UUID)"))),
    }
}

/// A project name (as carried in member certificates).
pub fn project(field: &'static str, value: &str) -> Result<()> {
    if ember_common::identity::valid_name(value) {
        Ok(())
    } else {
        Err(Error::invalid(field, format!("{value:?} is not a valid project name")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks() {
        assert!(required_name("name", "gold").is_ok());
        assert!(required_name("name", "").is_err());
        assert!(required_name("name", " gold").is_err());
        assert!(required_name("name", &"x".repeat(256)).is_err());
        assert!(required_name("name", "a\nb").is_err());
        assert!(spec_key("extra_specs", "capabilities:thin_provisioning_support").is_ok());
        assert!(spec_key("extra_specs", "bad key").is_err());
        assert!(spec_key("extra_specs", "").is_err());
        assert!(uuid("id", "0a0a0a0a-1b1b-4c2c-8d3d-4e4e4e4e4e4e").is_ok());
        assert!(uuid("id", "0A0A0A0A-1B1B-4C2C-8D3D-4E4E4E4E4E4E").is_err());
        assert!(uuid("id", "nope").is_err());
        let e = required_name("name", "").unwrap_err().to_string();
        assert!(e.starts_with("name:"), "{e}");
    }
}
