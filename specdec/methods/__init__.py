"""What drafts and verifies: the one draft-then-verify loop (speculative), the proposers it asks for drafts
(proposers, over trainfree's tables, datastore's corpora and drafters' trained heads), draft trees (tree) and the
acceptance rules (verify); training drafters (train). Imports only the model wing below it."""
