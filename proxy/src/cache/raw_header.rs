//! Serialized metadata that is quick to read back, for the memory tier.
//!
//! `CacheMeta::serialize` compresses the response header with zstd, and
//! `CacheMeta::deserialize` decompresses it on every hit. For a header of a few hundred bytes,
//! building the decoder's tables cost more instructions than the rest of a memory hit's
//! lookup. The memory tier keeps the header as a zstd frame of raw (stored) blocks instead: the
//! same format, which `CacheMeta::deserialize` reads with a plain copy.

/// Largest decompressed header accepted; larger ones keep their compressed form.
const MAX_HEADER_BYTES: usize = 1 << 20;
/// Largest block of a zstd frame.
const MAX_BLOCK_BYTES: usize = 128 * 1024;
/// The zstd frame magic number, little endian.
const MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Returns `meta` (the output of `CacheMeta::serialize`) with its header part stored raw.
/// A header part that does not decompress is returned as it was: reading it fails later in
/// the same way it would have.
pub fn store_raw(meta: (Vec<u8>, Vec<u8>)) -> (Vec<u8>, Vec<u8>) {
    let (internal, header) = meta;
    match zstd::bulk::decompress(&header, MAX_HEADER_BYTES) {
        Ok(plain) => (internal, raw_frame(&plain)),
        Err(_) => (internal, header),
    }
}

/// Wraps `data` in a single-segment zstd frame of raw blocks (RFC 8878, section 3.1.1).
fn raw_frame(data: &[u8]) -> Vec<u8> {
    let blocks = data.len() / MAX_BLOCK_BYTES + 1;
    let mut frame = Vec::with_capacity(data.len() + MAGIC.len() + 9 + 3 * blocks);
    frame.extend_from_slice(&MAGIC);
    // Frame header descriptor: bit 5 marks a single segment (no window descriptor), and bits 7-6
    // give the size of the content size field that follows.
    let len = data.len();
    if let Ok(small) = u8::try_from(len) {
        frame.push(0b0010_0000);
        frame.push(small);
    } else if let Ok(medium) = u16::try_from(len - 256) {
        frame.push(0b0110_0000);
        frame.extend_from_slice(&medium.to_le_bytes());
    } else if let Ok(large) = u32::try_from(len) {
        frame.push(0b1010_0000);
        frame.extend_from_slice(&large.to_le_bytes());
    } else {
        frame.push(0b1110_0000);
        frame.extend_from_slice(&(len as u64).to_le_bytes());
    }
    let mut chunks = data.chunks(MAX_BLOCK_BYTES).peekable();
    if chunks.peek().is_none() {
        block_header(&mut frame, 0, true);
    }
    while let Some(chunk) = chunks.next() {
        block_header(&mut frame, chunk.len(), chunks.peek().is_none());
        frame.extend_from_slice(chunk);
    }
    frame
}

/// Appends the 3-byte header of a raw block of `len` bytes (at most [`MAX_BLOCK_BYTES`]).
fn block_header(frame: &mut Vec<u8>, len: usize, last: bool) {
    // Bit 0: last block; bits 1-2: block type, 0 for raw; bits 3-23: block size.
    let header = u32::from(last) | ((len as u32) << 3);
    frame.extend_from_slice(&header.to_le_bytes()[..3]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::cache::CacheMeta;
    use pingora::http::ResponseHeader;
    use std::time::{Duration, SystemTime};

    #[test]
    fn raw_frames_decompress_to_their_content() {
        for len in [
            0, 1, 255, 256, 300, 65_791, 65_792, 131_072, 131_073, 300_000,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let frame = raw_frame(&data);
            let back = zstd::bulk::decompress(&frame, len.max(1)).expect("valid frame");
            assert_eq!(back, data, "length {len}");
        }
    }

    #[test]
    fn stored_meta_reads_back_the_same() {
        let mut header = ResponseHeader::build(200, None).expect("status");
        header
            .insert_header("Content-Type", "application/json")
            .expect("field");
        header.insert_header("ETag", "\"abc\"").expect("field");
        header
            .insert_header("X-Export-Id", "20260101T120000Z")
            .expect("field");
        let now = SystemTime::now();
        let meta = CacheMeta::new(now + Duration::from_secs(60), now, 30, 600, header);
        let compressed = meta.serialize().expect("serialize");
        let raw = store_raw(compressed.clone());
        assert_eq!(raw.0, compressed.0);
        let read = CacheMeta::deserialize(&raw.0, &raw.1).expect("raw form reads");
        let expected = CacheMeta::deserialize(&compressed.0, &compressed.1).expect("reads");
        assert_eq!(read.fresh_until(), expected.fresh_until());
        assert_eq!(read.stale_if_error_sec(), 600);
        let wire = |m: &CacheMeta| {
            let mut out = Vec::new();
            m.response_header().header_to_h1_wire(&mut out);
            out
        };
        assert_eq!(wire(&read), wire(&expected));
    }

    #[test]
    fn undecodable_header_is_kept() {
        let meta = (vec![1, 2, 3], b"not zstd".to_vec());
        assert_eq!(store_raw(meta.clone()), meta);
    }
}
