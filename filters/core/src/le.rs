//! A little-endian cursor for the records kept in Envoy's shared data
//! (failover health, canary guard): reads that cannot run past the end.

/// Reads zeros past the end; callers check the length first.
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl Reader<'_> {
    pub(crate) fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        if let (Some(head), Some(rest)) = (self.0.get(..N), self.0.get(N..)) {
            out.copy_from_slice(head);
            self.0 = rest;
        }
        out
    }
    pub(crate) fn u8(&mut self) -> u8 {
        u8::from_le_bytes(self.take())
    }
    pub(crate) fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    pub(crate) fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    pub(crate) fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}
