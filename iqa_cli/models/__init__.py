"""Model families behind the `Backbone` interface (`backbone.py`), one folder each, picked by the registry."""
