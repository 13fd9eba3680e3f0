"""The command bodies (``prune``, ``fit``) as steps a reader can follow: validate, prune or fit,
validate, report; plus the output folders a run owns and the report's named sections."""
