//! The bytes of a message: the format version (a postcard varint), then the message
//! (postcard). A payload larger than [`MAX_PAYLOAD`], of another format, malformed or
//! with bytes left over is an error naming which.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The format of every message; a change that old peers cannot read bumps it.
pub const FORMAT: u16 = 1;
/// No payload is larger, either way.
pub const MAX_PAYLOAD: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("payload of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("message format {0} is not supported (this side speaks {FORMAT})")]
    Format(u16),
    #[error("malformed message: {0}")]
    Malformed(postcard::Error),
    #[error("{0} bytes left over after the message")]
    Trailing(usize),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("message of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("cannot encode message: {0}")]
    Postcard(postcard::Error),
}

pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, EncodeError> {
    let mut out = postcard::to_stdvec(&FORMAT).map_err(EncodeError::Postcard)?;
    out.extend(postcard::to_stdvec(msg).map_err(EncodeError::Postcard)?);
    if out.len() > MAX_PAYLOAD {
        return Err(EncodeError::TooLarge(out.len()));
    }
    Ok(out)
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() > MAX_PAYLOAD {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    let (format, rest) = postcard::take_from_bytes::<u16>(bytes).map_err(DecodeError::Malformed)?;
    if format != FORMAT {
        return Err(DecodeError::Format(format));
    }
    let (msg, rest) = postcard::take_from_bytes::<T>(rest).map_err(DecodeError::Malformed)?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing(rest.len()));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Status;

    #[test]
    fn version_size_and_leftovers_are_checked() {
        let ok = encode(&Status::Online).unwrap();
        assert_eq!(decode::<Status>(&ok), Ok(Status::Online));
        let mut other = postcard::to_stdvec(&(FORMAT + 1)).unwrap();
        other.extend(postcard::to_stdvec(&Status::Online).unwrap());
        assert_eq!(
            decode::<Status>(&other),
            Err(DecodeError::Format(FORMAT + 1))
        );
        let mut long = ok.clone();
        long.push(0);
        assert_eq!(decode::<Status>(&long), Err(DecodeError::Trailing(1)));
        assert_eq!(
            decode::<Status>(&vec![0; MAX_PAYLOAD + 1]),
            Err(DecodeError::TooLarge(MAX_PAYLOAD + 1))
        );
        assert!(matches!(
            decode::<Status>(&[]),
            Err(DecodeError::Malformed(_))
        ));
    }
}
