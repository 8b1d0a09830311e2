"""The embedded digits data (scikit-learn's ``load_digits``) and the example LightningModules the configs train."""
