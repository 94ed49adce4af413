//! The launch environment: where this process sits in a multi-process run
//! ([`DistEnv`]), read from the variables that ferrovit's launcher, torchrun or SLURM
//! set, and joining the [`TcpGroup`] it describes.

use super::mesh::TcpGroup;
use crate::error::{Error, Result};
use std::time::Duration;

/// Where this process sits in a multi-process run, as the launcher (ferrovit's, or
/// torchrun, or SLURM) describes it in the environment.
#[derive(Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world: usize,
    /// The rank among the processes of this machine (LOCAL_RANK or SLURM_LOCALID),
    /// when given.
    pub local_rank: Option<usize>,
    /// The processes of the run on this machine (LOCAL_WORLD_SIZE, as torchrun and
    /// `ferrovit launch` set it), when given.
    pub local_world: Option<usize>,
    pub master_addr: String,
    pub master_port: u16,
    /// The run's shared secret (FERROVIT_SECRET; empty when unset), which every
    /// connection between its processes proves knowledge of.
    pub secret: String,
}

impl std::fmt::Debug for DistEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // the secret stays out of logs
        f.debug_struct("DistEnv")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("local_rank", &self.local_rank)
            .field("local_world", &self.local_world)
            .field("master_addr", &self.master_addr)
            .field("master_port", &self.master_port)
            .field("secret", &format_args!("({} bytes)", self.secret.len()))
            .finish()
    }
}

impl DistEnv {
    /// Reads RANK, WORLD_SIZE (or SLURM_PROCID, SLURM_NTASKS where those are unset),
    /// LOCAL_RANK (or SLURM_LOCALID), LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT and FERROVIT_SECRET. `Ok(None)` when no
    /// world size is set; malformed or missing values are errors naming the variable.
    pub fn from_env() -> Result<Option<DistEnv>> {
        Self::from_lookup(|k| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned()))
    }

    /// As [`DistEnv::from_env`], reading variables through `var`.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>> {
        // (name, value) of the first of `names` that is set
        let first = |names: &[&'static str]| {
            names
                .iter()
                .find_map(|&n| var(n).map(|v| (n, v.trim().to_string())))
        };
        let int = |(name, v): (&str, String)| {
            v.parse::<usize>()
                .map_err(|_| Error::Config(format!("{name}={v:?} is not a non-negative integer")))
        };
        let Some(world_var) = first(&["WORLD_SIZE", "SLURM_NTASKS"]) else {
            return Ok(None);
        };
        let world_name = world_var.0;
        let world = int(world_var)?;
        if world == 0 {
            return Err(Error::Config(format!(
                "{world_name}=0: a group needs a rank"
            )));
        }
        let rank_var = first(&["RANK", "SLURM_PROCID"])
            .ok_or_else(|| Error::Config(format!("{world_name}={world} is set but RANK is not")))?;
        let rank_name = rank_var.0;
        let rank = int(rank_var)?;
        if rank >= world {
            return Err(Error::Config(format!(
                "{rank_name}={rank} is not below {world_name}={world}"
            )));
        }
        let local_rank = first(&["LOCAL_RANK", "SLURM_LOCALID"])
            .map(int)
            .transpose()?;
        let local_world = match first(&["LOCAL_WORLD_SIZE"]).map(int).transpose()? {
            Some(0) => {
                return Err(Error::Config(
                    "LOCAL_WORLD_SIZE=0: must be at least 1".into(),
                ))
            }
            n => n,
        };
        let master_addr = match first(&["MASTER_ADDR"]) {
            Some((_, v)) if !v.is_empty() => v,
            Some(_) => return Err(Error::Config("MASTER_ADDR is empty".into())),
            None if world == 1 => "127.0.0.1".into(),
            None => {
                return Err(Error::Config(format!(
                    "MASTER_ADDR is not set (needed to find rank 0 of {world_name}={world})"
                )))
            }
        };
        let master_port = match first(&["MASTER_PORT"]) {
            Some((name, v)) => v
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0 || world == 1)
                .ok_or_else(|| {
                    Error::Config(format!("{name}={v:?} is not a port number (1-65535)"))
                })?,
            None if world == 1 => 0,
            None => {
                return Err(Error::Config(format!(
                    "MASTER_PORT is not set (needed to find rank 0 of {world_name}={world})"
                )))
            }
        };
        Ok(Some(DistEnv {
            rank,
            world,
            local_rank,
            local_world,
            master_addr,
            master_port,
            // as given: surrounding spaces would be part of it on every rank alike
            secret: var("FERROVIT_SECRET").unwrap_or_default(),
        }))
    }

    /// Joins the group this environment describes.
    pub fn connect(&self, timeout: Duration) -> Result<TcpGroup> {
        TcpGroup::connect_with_secret(
            self.rank,
            self.world,
            &self.master_addr,
            self.master_port,
            timeout,
            self.secret.as_bytes(),
        )
    }
}
