//! Linux swap, version 1 (docs/FILESYSTEMS.md, "Linux swap"): only the header page is used.

use blksync_core::Result;

use crate::{Kind, Reader, Verdict};

/// Page sizes tried, in this order.
const PAGE_SIZES: [u64; 5] = [4096, 8192, 16384, 32768, 65536];
/// Signatures at the same place that mean the area holds a hibernation image.
const HIBERNATION: [&[u8]; 4] = [b"S1SUSPEND", b"S2SUSPEND", b"ULSUSPEND", b"LINHIB0001"];

/// The kind and header size of a swap area: `Ok(None)` when there is no swap signature.
pub(crate) fn probe(reader: &Reader<'_>) -> Result<Option<Verdict<(Kind, u64)>>> {
    let mut magic = [0u8; 10];
    for page in PAGE_SIZES {
        if reader.len < page {
            break;
        }
        reader.read(&mut magic, page - 10)?;
        if HIBERNATION.iter().any(|sig| magic.starts_with(sig)) {
            return Ok(Some(Err("a swap area holding a hibernation image".into())));
        }
        if &magic != b"SWAPSPACE2" {
            continue;
        }
        let mut header = [0u8; 44];
        reader.read(&mut header, 1024)?;
        let version = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        if version != 1 {
            return Ok(Some(Err(format!("swap header version {version:#x} is not supported"))));
        }
        let kind = Kind::Swap { uuid: crate::uuid(&header[12..28]), label: crate::label(&header[28..44]) };
        return Ok(Some(Ok((kind, page))));
    }
    Ok(None)
}
