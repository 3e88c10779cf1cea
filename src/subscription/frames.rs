//! The frame boundaries of the byte stream a client sends the AMQP 1.0 endpoint, followed as
//! the bytes arrive, so that a frame the AMQP library would choke on never reaches it.
//!
//! The stream is protocol headers (`AMQP` and four bytes) and frames (a 4-byte big-endian
//! size that counts the whole frame, then the rest). fe2o3-amqp's frame decoders read the
//! 4 bytes after the size (data offset, type, channel) without checking they are there, so a
//! frame whose size is 4 to 7 made them panic ("advance out of bounds") in the connection's
//! task: the robustness suite found it with raw bytes against the live endpoint. [`FrameScan`]
//! refuses such a frame before its bytes are handed on; the socket is then closed like any
//! other malformed connection.

/// The smallest frame: its 8-byte header (size, data offset, type, channel).
pub const MIN_FRAME: u32 = 8;

/// Where in the stream the scan is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum At {
    /// Between frames: the first bytes of a protocol header or of a frame's size so far.
    Boundary { head: [u8; 4], len: usize },
    /// Inside a frame (or a header): this many bytes of it still to come.
    Inside(u64),
}

/// Follows frame boundaries across reads; see the module doc.
#[derive(Clone, Debug)]
pub struct FrameScan {
    at: At,
}

impl Default for FrameScan {
    fn default() -> Self {
        FrameScan {
            at: At::Boundary {
                head: [0; 4],
                len: 0,
            },
        }
    }
}

impl FrameScan {
    /// Takes the next bytes of the stream. `Err` (saying why) when a frame among them declares
    /// a size below its own header; the stream must then end.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), String> {
        while !bytes.is_empty() {
            match &mut self.at {
                At::Inside(left) => {
                    let n = (*left).min(bytes.len() as u64) as usize;
                    *left -= n as u64;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        *self = FrameScan::default();
                    }
                }
                At::Boundary { head, len } => {
                    head[*len] = bytes[0];
                    *len += 1;
                    bytes = &bytes[1..];
                    if *len < 4 {
                        continue;
                    }
                    if *head == *b"AMQP" {
                        // A protocol header: 8 bytes, then a boundary again.
                        self.at = At::Inside(4);
                        continue;
                    }
                    let size = u32::from_be_bytes(*head);
                    if size < MIN_FRAME {
                        return Err(format!(
                            "a frame declares {size} bytes, less than its {MIN_FRAME}-byte header"
                        ));
                    }
                    self.at = At::Inside(u64::from(size) - 4);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = ((8 + body.len()) as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&[2, 0, 0, 0]);
        f.extend_from_slice(body);
        f
    }

    fn stream() -> Vec<u8> {
        [
            b"AMQP\x03\x01\x00\x00".to_vec(),
            frame(b"sasl-init"),
            b"AMQP\x00\x01\x00\x00".to_vec(),
            frame(b"open"),
            frame(b""),
            frame(&[0xAA; 300]),
        ]
        .concat()
    }

    #[test]
    fn well_formed_streams_pass_however_they_are_split() {
        let bytes = stream();
        for chunk in [1, 2, 3, 5, 7, 8, 13, 64, bytes.len()] {
            let mut scan = FrameScan::default();
            for part in bytes.chunks(chunk) {
                scan.feed(part)
                    .unwrap_or_else(|e| panic!("chunks of {chunk}: {e}"));
            }
            assert_eq!(scan.at, FrameScan::default().at, "ends on a boundary");
        }
    }

    #[test]
    fn a_frame_shorter_than_its_header_is_refused_wherever_it_is() {
        for size in 0..MIN_FRAME {
            let short = size.to_be_bytes();
            for prefix in [&b""[..], b"AMQP\x03\x01\x00\x00", &stream()] {
                let bytes = [prefix, &short, b"\x02\x01\x00\x00"].concat();
                let mut scan = FrameScan::default();
                let refused = bytes.chunks(3).find_map(|part| scan.feed(part).err());
                let why = refused.unwrap_or_else(|| panic!("size {size} passed"));
                assert!(why.contains(&format!("declares {size} bytes")), "{why}");
            }
        }
        // The largest size is a frame like any other (the library refuses it as too large).
        let mut scan = FrameScan::default();
        assert!(scan.feed(&[0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0]).is_ok());
    }
}
