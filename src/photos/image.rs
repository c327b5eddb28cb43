//! Generated product images for the seed: deterministic per product, each
//! visibly distinct (colours and shapes from the id), a few KiB of PNG.

use sha2::{Digest, Sha256};

const SIZE: u32 = 96;

/// Strong validator of a photo's bytes, quoted as HTTP wants it.
pub fn etag(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("\"{hex}\"")
}

/// Detects the image type from the first bytes, so an upload's declared type
/// can be checked against what it really is.
pub fn sniff(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        Some("image/jpeg")
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some("image/gif")
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some("image/webp")
    } else {
        None
    }
}

pub fn product_png(id: u64) -> Vec<u8> {
    let mut seed = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        // xorshift64: deterministic noise, no need for a real RNG here.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let base = [
        (next() % 200) as u8 + 30,
        (next() % 200) as u8 + 30,
        (next() % 200) as u8 + 30,
    ];
    let accent = [255 - base[0], 255 - base[1], 255 - base[2]];
    let cx = (next() % SIZE as u64) as i64;
    let cy = (next() % SIZE as u64) as i64;
    let rings = 3 + (next() % 6) as i64;
    let mut pixels = Vec::with_capacity((SIZE * SIZE * 3) as usize);
    for y in 0..SIZE as i64 {
        for x in 0..SIZE as i64 {
            let d2 = (x - cx) * (x - cx) + (y - cy) * (y - cy);
            let ring = ((d2 as f64).sqrt() as i64 * rings / SIZE as i64) % 2 == 0;
            let noise = (next() % 24) as u8;
            let c = if ring { accent } else { base };
            let shade = ((x + y) as u8) / 4;
            pixels.extend(c.iter().map(|v| v.saturating_add(noise).saturating_sub(shade)));
        }
    }
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, SIZE, SIZE);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        // Encoding a well-formed in-memory buffer of the declared size cannot fail.
        let mut writer = encoder.write_header().expect("png header");
        writer.write_image_data(&pixels).expect("png data");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_distinct_pngs_of_a_few_kib() {
        let a = product_png(1);
        let b = product_png(2);
        assert_ne!(a, b);
        assert_eq!(sniff(&a), Some("image/png"));
        assert!(a.len() > 2_000 && a.len() < 64_000, "{} bytes", a.len());
        assert_ne!(etag(&a), etag(&b));
    }
}
