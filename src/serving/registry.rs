//! The adapters a server knows, which of them are resident in the mixed model, and the admin
//! commands that change them while it runs.
//!
//! An adapter is registered by name with a way to build its model over the base (from its
//! directory, or in memory for `bench serve`). At most `max_resident` are attached to the mixed
//! model at once: a request for one that is not brings it in, and the least recently used one
//! with no request in flight goes (`Llama::set_mixed_model`). When every resident adapter has
//! requests in flight, the request waits for one of them to end.

use std::sync::{Arc, RwLock};

use tokio::sync::oneshot;

use crate::model::{Llama, RowModels};
use crate::{Error, Result};

/// How to build an adapter's model over the base.
pub type Loader = Arc<dyn Fn(&Llama) -> Result<Llama> + Send + Sync>;
/// How to build the model of an adapter directory named by the admin endpoint.
pub type PathLoader = Arc<dyn Fn(&Llama, &str) -> Result<Llama> + Send + Sync>;

/// A refused admin command: its HTTP status and why.
#[derive(Debug)]
pub struct AdminError {
    pub status: u16,
    pub message: String,
}

fn refused(status: u16, message: impl Into<String>) -> AdminError {
    AdminError { status, message: message.into() }
}

pub enum Admin {
    Load { name: String, path: String, reply: oneshot::Sender<std::result::Result<(), AdminError>> },
    Unload { name: String, reply: oneshot::Sender<std::result::Result<(), AdminError>> },
    /// Every adapter and whether it is resident.
    List { reply: oneshot::Sender<Vec<(String, bool)>> },
}

struct Slot {
    name: String,
    loader: Loader,
    resident: bool,
    last_used: u64,
}

pub struct Registry {
    base: Llama,
    /// `Llama::mixed` over the base and the resident adapters; model i + 1 is `slots[i]`.
    pub model: Llama,
    pub rows: Arc<RowModels>,
    slots: Vec<Option<Slot>>,
    /// What the HTTP side resolves a request's `model` with: index 0 the base, i + 1 slot i.
    names: Arc<RwLock<Vec<Option<String>>>>,
    max_resident: usize,
    clock: u64,
    path_loader: Option<PathLoader>,
}

impl Registry {
    /// Every adapter is built once here, so that a bad one stops the start naming it; the first
    /// `max_resident` stay attached.
    pub fn new(
        base: Llama,
        adapters: Vec<(String, Loader)>,
        max_resident: usize,
        path_loader: Option<PathLoader>,
        names: Arc<RwLock<Vec<Option<String>>>>,
    ) -> Result<Self> {
        let (model, rows) = Llama::mixed(vec![base.share_base()])?;
        let mut registry = Self { base, model, rows, slots: Vec::new(), names, max_resident: max_resident.max(1), clock: 0, path_loader };
        for (name, loader) in adapters {
            let built = loader(&registry.base).map_err(|e| Error::msg(format!("adapter {name}: {e}")))?;
            let index = registry.register(name, loader);
            if registry.resident() < registry.max_resident {
                registry.attach(index, built)?;
            }
        }
        Ok(registry)
    }

    fn resident(&self) -> usize {
        self.slots.iter().flatten().filter(|s| s.resident).count()
    }

    /// A new slot (a free one, or at the end) named `name`: its model index.
    fn register(&mut self, name: String, loader: Loader) -> usize {
        let slot = Slot { name: name.clone(), loader, resident: false, last_used: 0 };
        let i = match self.slots.iter().position(Option::is_none) {
            Some(i) => {
                self.slots[i] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        let mut names = self.names.write().unwrap_or_else(|p| p.into_inner());
        if names.len() <= i + 1 {
            names.resize(i + 2, None);
        }
        names[i + 1] = Some(name);
        i + 1
    }

    fn slot(&mut self, index: usize) -> Option<&mut Slot> {
        index.checked_sub(1).and_then(|i| self.slots.get_mut(i)).and_then(Option::as_mut)
    }

    fn attach(&mut self, index: usize, model: Llama) -> Result<()> {
        self.model.set_mixed_model(&self.rows, index, Some(model))?;
        if let Some(s) = self.slot(index) {
            s.resident = true;
        }
        Ok(())
    }

    fn detach(&mut self, index: usize) -> Result<()> {
        self.model.set_mixed_model(&self.rows, index, None)?;
        if let Some(s) = self.slot(index) {
            s.resident = false;
        }
        Ok(())
    }

    /// Whether model `index` is still the adapter the request named (it may have been unloaded,
    /// its slot reused, between the request and now).
    pub fn is(&self, index: usize, name: &str) -> bool {
        let names = self.names.read().unwrap_or_else(|p| p.into_inner());
        names.get(index).and_then(Option::as_deref) == Some(name)
    }

    /// Attach model `index` if it is not: false when every resident adapter has requests in
    /// flight (`in_use`) and the set is full.
    pub fn make_resident(&mut self, index: usize, in_use: &dyn Fn(usize) -> bool) -> Result<bool> {
        self.clock += 1;
        let clock = self.clock;
        let Some(slot) = self.slot(index) else {
            return Ok(index == 0);
        };
        slot.last_used = clock;
        if slot.resident {
            return Ok(true);
        }
        let loader = slot.loader.clone();
        if self.resident() >= self.max_resident && !self.evict_lru(in_use)? {
            return Ok(false);
        }
        let model = loader(&self.base)?;
        self.attach(index, model)?;
        Ok(true)
    }

    /// Carry out an admin command; `in_use(index)` counts the requests in flight for a model.
    pub fn admin(&mut self, command: Admin, in_use: &dyn Fn(usize) -> usize) {
        match command {
            Admin::Load { name, path, reply } => {
                let _ = reply.send(self.load(name, path, in_use));
            }
            Admin::Unload { name, reply } => {
                let _ = reply.send(self.unload(&name, in_use));
            }
            Admin::List { reply } => {
                let _ = reply.send(self.slots.iter().flatten().map(|s| (s.name.clone(), s.resident)).collect());
            }
        }
    }

    fn load(&mut self, name: String, path: String, in_use: &dyn Fn(usize) -> usize) -> std::result::Result<(), AdminError> {
        if self.names.read().unwrap_or_else(|p| p.into_inner()).iter().flatten().any(|n| *n == name) {
            return Err(refused(409, format!("the name `{name}` is taken")));
        }
        let Some(path_loader) = self.path_loader.clone() else {
            return Err(refused(400, "this server loads no adapter from a path"));
        };
        // Built now, so that a bad directory is this request's error.
        let model = path_loader(&self.base, &path).map_err(|e| refused(400, format!("adapter {name} from {path}: {e}")))?;
        let loader: Loader = Arc::new(move |base: &Llama| path_loader(base, &path));
        let index = self.register(name, loader);
        let full = self.resident() >= self.max_resident;
        let room = !full || self.evict_lru(&|m| in_use(m) > 0).map_err(|e| refused(500, e.to_string()))?;
        if room {
            self.attach(index, model).map_err(|e| refused(500, e.to_string()))?;
        }
        Ok(())
    }

    /// Detach the least recently used resident adapter that is not `in_use`; whether one was.
    fn evict_lru(&mut self, in_use: &dyn Fn(usize) -> bool) -> Result<bool> {
        let victim = (0..self.slots.len()).filter_map(|i| self.slots[i].as_ref().filter(|s| s.resident && !in_use(i + 1)).map(|s| (s.last_used, i + 1))).min();
        match victim {
            Some((_, v)) => self.detach(v).map(|()| true),
            None => Ok(false),
        }
    }

    fn unload(&mut self, name: &str, in_use: &dyn Fn(usize) -> usize) -> std::result::Result<(), AdminError> {
        let index = {
            let names = self.names.read().unwrap_or_else(|p| p.into_inner());
            names.iter().skip(1).position(|n| n.as_deref() == Some(name)).map(|i| i + 1)
        };
        let Some(index) = index else {
            return Err(refused(404, format!("no adapter `{name}`")));
        };
        let busy = in_use(index);
        if busy > 0 {
            return Err(refused(409, format!("adapter `{name}` has {busy} requests in flight")));
        }
        if self.slot(index).is_some_and(|s| s.resident) {
            self.detach(index).map_err(|e| refused(500, e.to_string()))?;
        }
        self.slots[index - 1] = None;
        self.names.write().unwrap_or_else(|p| p.into_inner())[index] = None;
        Ok(())
    }
}
