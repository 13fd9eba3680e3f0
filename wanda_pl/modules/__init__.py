"""The LightningModules (``CausalLM``, ``Classifier``) and the contract they implement for the
engine, the callbacks and the commands (:mod:`.protocol`); what they share is in :mod:`.common`."""
