"""Model families behind the `Backbone` interface (`backbone.py`), one folder each (`mplug_owl2/`)."""
