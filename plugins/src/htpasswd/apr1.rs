//! Computes Apache's `$apr1$` password digests (MD5-crypt with the `$apr1$` magic string).

use md5::{Digest, Md5};

/// Length of the encoded digest that follows the salt in an `$apr1$` hash.
pub const DIGEST_LEN: usize = 22;

/// Maximum salt length the algorithm reads. Longer salts are cut to this length.
pub const MAX_SALT_LEN: usize = 8;

/// The 64 characters of the crypt(3) base-64 encoding, in value order.
const ITOA64: &[u8; 64] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

const MAGIC: &[u8] = b"$apr1$";

/// Number of MD5 rounds that stretch the digest.
const ROUNDS: usize = 1000;

/// Computes the encoded digest of `password` with `salt`, as it appears after the second `$`
/// of the salt in a `$apr1$<salt>$<digest>` line.
pub fn digest(password: &[u8], salt: &[u8]) -> [u8; DIGEST_LEN] {
    let salt = &salt[..salt.len().min(MAX_SALT_LEN)];
    let alternate = Md5::new()
        .chain_update(password)
        .chain_update(salt)
        .chain_update(password)
        .finalize();

    let mut ctx = Md5::new();
    ctx.update(password);
    ctx.update(MAGIC);
    ctx.update(salt);
    for chunk in password.chunks(16) {
        ctx.update(&alternate[..chunk.len()]);
    }
    let first = password.get(..1).unwrap_or_default();
    let mut bits = password.len();
    while bits > 0 {
        if bits & 1 == 1 {
            ctx.update([0u8]);
        } else {
            ctx.update(first);
        }
        bits >>= 1;
    }
    let mut sum: [u8; 16] = ctx.finalize().into();

    for round in 0..ROUNDS {
        let mut ctx = Md5::new();
        if round % 2 == 1 {
            ctx.update(password);
        } else {
            ctx.update(sum);
        }
        if round % 3 != 0 {
            ctx.update(salt);
        }
        if round % 7 != 0 {
            ctx.update(password);
        }
        if round % 2 == 1 {
            ctx.update(sum);
        } else {
            ctx.update(password);
        }
        sum = ctx.finalize().into();
    }
    encode(&sum)
}

/// Tells whether `text` is a digest that [`digest`] can produce: 22 characters of the crypt
/// alphabet whose last character carries only the 2 bits that remain.
pub fn is_canonical_digest(text: &[u8]) -> bool {
    let Some((last, rest)) = text.split_last() else {
        return false;
    };
    text.len() == DIGEST_LEN
        && rest.iter().all(|c| ITOA64.contains(c))
        && ITOA64[..4].contains(last)
}

/// Tells whether `salt` can be the salt of an `$apr1$` hash.
pub fn is_valid_salt(salt: &[u8]) -> bool {
    salt.len() <= MAX_SALT_LEN && salt.iter().all(|c| ITOA64.contains(c))
}

/// Encodes the 16 digest bytes in the byte order and bit order of MD5-crypt.
fn encode(sum: &[u8; 16]) -> [u8; DIGEST_LEN] {
    const GROUPS: [(usize, usize, usize); 5] =
        [(0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5)];
    let mut out = [0u8; DIGEST_LEN];
    let mut pos = 0;
    let mut push = |mut value: u32, count: usize| {
        for _ in 0..count {
            out[pos] = ITOA64[(value & 0x3f) as usize];
            value >>= 6;
            pos += 1;
        }
    };
    for (a, b, c) in GROUPS {
        push(
            u32::from(sum[a]) << 16 | u32::from(sum[b]) << 8 | u32::from(sum[c]),
            4,
        );
    }
    push(u32::from(sum[11]), 2);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines made here with `htpasswd -nbm`.
    #[test]
    fn digest_matches_htpasswd_m() {
        assert_eq!(&digest(b"pw1", b"Oc37A.hY"), b"i2ql/lh/lsFjguB64sjzO0");
    }

    #[test]
    fn digest_matches_password_with_colon() {
        assert_eq!(&digest(b"a:b", b"lA6Z5zDL"), b"EzVCIwnd/f8aHA.wd/n1X/");
    }

    #[test]
    fn digest_matches_long_password() {
        let password = [b'x'; 42];
        assert_eq!(&digest(&password, b"iGfSWl9q"), b"RtfpTyUjjjAYnwiqOGDeW/");
    }

    #[test]
    fn digest_matches_empty_password() {
        assert_eq!(&digest(b"", b"tPrMeXlH"), b"Bzps8rYNOp4.BAssXlHMA1");
    }

    #[test]
    fn digest_matches_utf8_password() {
        let password = "p\u{e4}ssw\u{f6}rd".as_bytes();
        assert_eq!(&digest(password, b"1G.YMG1u"), b"QrUP2KLiHBxdK1ue1RIhr.");
    }

    #[test]
    fn digest_cuts_salt_at_eight() {
        assert_eq!(digest(b"pw", b"12345678"), digest(b"pw", b"123456789"));
    }

    #[test]
    fn canonical_rejects_high_last_char() {
        assert!(!is_canonical_digest(b"i2ql/lh/lsFjguB64sjzOz"));
    }

    #[test]
    fn canonical_rejects_short() {
        assert!(!is_canonical_digest(b"i2ql/lh/lsFjguB64sjzO"));
    }

    #[test]
    fn canonical_rejects_foreign_char() {
        assert!(!is_canonical_digest(b"i2ql/lh/lsFjguB64sjz+0"));
    }

    #[test]
    fn salt_rejects_dollar() {
        assert!(!is_valid_salt(b"ab$c"));
    }
}
