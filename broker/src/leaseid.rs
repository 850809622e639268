//! Lease IDs of the tenant's own.
//!
//! etcd makes a lease ID from its member ID and a counter that every request advances, so
//! real IDs would tell a tenant the member ID and how busy the other tenants are. Each
//! tenant sees instead a keyed permutation of the real ID: Speck64/128 over the 64-bit
//! block, cycle-walked to stay in etcd's ID space (1 to 2^63-1), with a key derived
//! from a broker secret and the tenant's prefix. No table, no state: every replica that
//! shares the secret translates alike, and one real lease looks unrelated to each
//! tenant.
//!
//! The secret file holds one secret per line. The first is used both ways; the others
//! are earlier secrets, still accepted for IDs a client learnt before a rotation (see
//! docs/semantics.md).

use std::path::Path;

use etcd_client::proto::{PbEvent, PbKeyValue, PbResponseOp, PbTxnOpResponse as Op, PbTxnResponse};
use ring::hmac;

/// Domain separation for the key derivation; bump it to change every mapping at once.
const CONTEXT: &[u8] = b"etcd-shim lease ids v1\0";

/// Shortest secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("lease ID secret file {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("lease ID secret file {path} holds no secret")]
    Empty { path: String },
    #[error(
        "lease ID secret file {path}, line {line}: a secret needs at least {MIN_SECRET_LEN} bytes"
    )]
    Short { path: String, line: usize },
}

/// The broker's lease ID secrets: the current one first, then earlier ones.
#[derive(Clone)]
pub struct LeaseSecrets {
    keys: Vec<hmac::Key>,
}

impl std::fmt::Debug for LeaseSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LeaseSecrets({} keys)", self.keys.len())
    }
}

impl LeaseSecrets {
    /// Secrets from their bytes, current first.
    pub fn new<S: AsRef<[u8]>>(secrets: &[S]) -> Option<Self> {
        let keys: Vec<_> = secrets
            .iter()
            .map(|s| hmac::Key::new(hmac::HMAC_SHA256, s.as_ref()))
            .collect();
        (!keys.is_empty()).then_some(Self { keys })
    }

    /// Reads a secret file: one secret per line, blank lines and surrounding spaces
    /// ignored.
    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
        let shown = path.display().to_string();
        let text = std::fs::read(path).map_err(|error| SecretError::Read {
            path: shown.clone(),
            error,
        })?;
        let mut secrets = Vec::new();
        for (i, line) in text.split(|b| *b == b'\n').enumerate() {
            let line = line.trim_ascii();
            if line.is_empty() {
                continue;
            }
            if line.len() < MIN_SECRET_LEN {
                return Err(SecretError::Short {
                    path: shown,
                    line: i + 1,
                });
            }
            secrets.push(line.to_vec());
        }
        Self::new(&secrets).ok_or(SecretError::Empty { path: shown })
    }

    /// A secret of this process only: IDs change when it restarts, and replicas disagree.
    pub fn ephemeral() -> Self {
        let mut bytes = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .unwrap_or_else(|_| unreachable!("the system random source failed"));
        Self::new(&[bytes]).unwrap_or_else(|| unreachable!("one secret"))
    }

    /// The translation of one tenant, named by its key prefix.
    pub fn for_tenant(&self, prefix: &[u8]) -> LeaseIds {
        let ciphers = self
            .keys
            .iter()
            .map(|k| {
                let tag = hmac::sign(k, &[CONTEXT, prefix].concat());
                let b = tag.as_ref();
                let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
                Speck::new([word(0), word(4), word(8), word(12)])
            })
            .collect();
        LeaseIds { ciphers }
    }
}

/// One tenant's lease IDs: `seen` is what the tenant sees, `real` what etcd holds.
#[derive(Debug, Clone)]
pub struct LeaseIds {
    /// The current secret's first, then earlier ones.
    ciphers: Vec<Speck>,
}

/// etcd's lease IDs are positive int64; 0 means no lease.
fn in_space(x: u64) -> bool {
    x != 0 && x < 1 << 63
}

impl LeaseIds {
    /// What the tenant sees for the real lease `real`. 0 (no lease) and values outside
    /// etcd's ID space are left alone.
    pub fn seen(&self, real: i64) -> i64 {
        if real <= 0 {
            return real;
        }
        let c = &self.ciphers[0];
        let mut x = c.encrypt(real as u64);
        while !in_space(x) {
            x = c.encrypt(x);
        }
        x as i64
    }

    /// The real lease the tenant means by `seen`, under the current secret.
    pub fn real(&self, seen: i64) -> i64 {
        Self::decrypt(&self.ciphers[0], seen)
    }

    /// Every real lease `seen` may mean: under the current secret, then under each
    /// earlier one. The caller takes the first that the tenant owns.
    pub fn candidates(&self, seen: i64) -> impl Iterator<Item = i64> + '_ {
        self.ciphers.iter().map(move |c| Self::decrypt(c, seen))
    }

    /// Shows the tenant its own IDs in `lease` of every key.
    pub fn kvs(&self, kvs: &mut [PbKeyValue]) {
        for kv in kvs {
            self.kv(kv);
        }
    }

    fn kv(&self, kv: &mut PbKeyValue) {
        if kv.lease != 0 {
            kv.lease = self.seen(kv.lease);
        }
    }

    /// [`LeaseIds::kvs`] for every response of a transaction, nested ones included.
    pub fn txn(&self, resp: &mut PbTxnResponse) {
        for op in &mut resp.responses {
            self.op(op);
        }
    }

    fn op(&self, op: &mut PbResponseOp) {
        match &mut op.response {
            Some(Op::ResponseRange(r)) => self.kvs(&mut r.kvs),
            Some(Op::ResponsePut(r)) => r.prev_kv.iter_mut().for_each(|kv| self.kv(kv)),
            Some(Op::ResponseDeleteRange(r)) => self.kvs(&mut r.prev_kvs),
            Some(Op::ResponseTxn(t)) => self.txn(t),
            None => {}
        }
    }

    /// [`LeaseIds::kvs`] for watch events and their previous values.
    pub fn events(&self, events: &mut [PbEvent]) {
        for e in events {
            e.kv.iter_mut()
                .chain(e.prev_kv.iter_mut())
                .for_each(|kv| self.kv(kv));
        }
    }

    fn decrypt(c: &Speck, seen: i64) -> i64 {
        if seen <= 0 {
            return seen;
        }
        let mut x = c.decrypt(seen as u64);
        while !in_space(x) {
            x = c.decrypt(x);
        }
        x as i64
    }
}

/// Speck64/128 (Beaulieu et al., 2013): 32-bit words, 27 rounds.
#[derive(Clone)]
struct Speck {
    round_keys: [u32; 27],
}

impl std::fmt::Debug for Speck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Speck")
    }
}

impl Speck {
    /// `key` as the words (k0, l0, l1, l2) of the paper's key schedule.
    fn new(key: [u32; 4]) -> Self {
        let mut round_keys = [0u32; 27];
        let mut k = key[0];
        let mut l = [key[1], key[2], key[3]];
        for (i, rk) in round_keys.iter_mut().enumerate() {
            *rk = k;
            let next = (k.wrapping_add(l[i % 3].rotate_right(8))) ^ i as u32;
            l[i % 3] = next;
            k = k.rotate_left(3) ^ next;
        }
        Self { round_keys }
    }

    fn encrypt(&self, block: u64) -> u64 {
        let (mut x, mut y) = ((block >> 32) as u32, block as u32);
        for k in self.round_keys {
            x = x.rotate_right(8).wrapping_add(y) ^ k;
            y = y.rotate_left(3) ^ x;
        }
        (u64::from(x) << 32) | u64::from(y)
    }

    fn decrypt(&self, block: u64) -> u64 {
        let (mut x, mut y) = ((block >> 32) as u32, block as u32);
        for k in self.round_keys.iter().rev() {
            y = (y ^ x).rotate_right(3);
            x = ((x ^ k).wrapping_sub(y)).rotate_left(8);
        }
        (u64::from(x) << 32) | u64::from(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speck64_128_matches_the_papers_test_vector() {
        // Key 1b1a1918 13121110 0b0a0908 03020100 (l2 l1 l0 k0),
        // plaintext 3b726574 7475432d, ciphertext 8c6fa548 454e028b.
        let c = Speck::new([0x03020100, 0x0b0a0908, 0x13121110, 0x1b1a1918]);
        assert_eq!(c.encrypt(0x3b72_6574_7475_432d), 0x8c6f_a548_454e_028b);
        assert_eq!(c.decrypt(0x8c6f_a548_454e_028b), 0x3b72_6574_7475_432d);
    }

    fn ids(prefix: &[u8]) -> LeaseIds {
        LeaseSecrets::new(&[b"0123456789abcdef0123"])
            .unwrap()
            .for_tenant(prefix)
    }

    #[test]
    fn ids_round_trip_and_stay_in_etcds_space() {
        let t = ids(b"/t/a/");
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            let real = (state >> 1).max(1) as i64;
            let seen = t.seen(real);
            assert!(seen > 0, "{seen} outside etcd's lease ID space");
            assert_eq!(t.real(seen), real);
        }
        for edge in [1, 2, i64::MAX, i64::MAX - 1] {
            assert_eq!(t.real(t.seen(edge)), edge);
            assert!(t.seen(edge) > 0);
        }
        assert_eq!(t.seen(0), 0);
        assert_eq!(t.real(0), 0);
        assert_eq!(t.real(-5), -5);
    }

    #[test]
    fn tenants_see_one_lease_differently_and_consecutive_ids_scatter() {
        let (a, b) = (ids(b"/t/a/"), ids(b"/t/b/"));
        // Real IDs as etcd makes them: member bits on top, then a counter.
        let member = 0x694d_7b2c_u64 << 32 >> 1;
        let seen: Vec<i64> = (0..64).map(|n| a.seen((member + n) as i64)).collect();
        for (n, s) in seen.iter().enumerate() {
            assert_ne!(*s, b.seen((member + n as u64) as i64));
        }
        // Neither the high bits nor the steps between grants carry a pattern.
        let high: std::collections::HashSet<i64> = seen.iter().map(|s| s >> 40).collect();
        assert!(high.len() > 60, "high bits repeat: {high:?}");
        let steps: std::collections::HashSet<i64> =
            seen.windows(2).map(|w| w[1].wrapping_sub(w[0])).collect();
        assert_eq!(steps.len(), seen.len() - 1);
    }

    #[test]
    fn earlier_secrets_still_name_the_lease() {
        let old = LeaseSecrets::new(&[b"old secret, sixteen+"]).unwrap();
        let both = LeaseSecrets::new(&[b"new secret, sixteen+", b"old secret, sixteen+"]).unwrap();
        let (old, both) = (old.for_tenant(b"/t/a/"), both.for_tenant(b"/t/a/"));
        let real = 0x3a2b_0000_0000_0042;
        let learnt = old.seen(real);
        assert_ne!(
            both.seen(real),
            learnt,
            "the new secret must change the view"
        );
        assert!(both.candidates(learnt).any(|r| r == real));
        assert_eq!(both.candidates(both.seen(real)).next(), Some(real));
    }

    #[test]
    fn secret_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, "\n  0123456789abcdef  \nanother secret here\n").unwrap();
        assert_eq!(LeaseSecrets::from_file(&p).unwrap().keys.len(), 2);
        std::fs::write(&p, "short\n").unwrap();
        let e = LeaseSecrets::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("16 bytes"), "{e}");
        std::fs::write(&p, "\n \n").unwrap();
        assert!(matches!(
            LeaseSecrets::from_file(&p),
            Err(SecretError::Empty { .. })
        ));
    }
}
