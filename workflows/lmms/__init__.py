"""nvila as an lmms-eval plugin: ``LMMS_EVAL_PLUGINS=nvila.workflows.lmms python -m lmms_eval --model nvila
--model_args pretrained=DIR --tasks ...`` (lmms-eval imports ``<plugin>.models`` and its ``AVAILABLE_MODELS``)."""
