"""Loads the ComfyUI and A1111 glue the way the hosts do, against stand-ins of only what their import needs.

Usage: python glue_loader.py COMFYUI_FOLDER/__init__.py A1111_EXTENSION/scripts/kdiff_align_cfg.py
Prints JSON: where kdiff_align was imported from, whether the glue changed sys.path, the nodes and the script.
"""

import importlib.util
import json
import sys
import types


def stand_in(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def noop(*args, **kwargs):
    return None


def load(name, file):
    """ComfyUI's load_custom_node and A1111's load_module: a spec from the file, registered, executed."""
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


stand_in('comfy', samplers=stand_in('comfy.samplers', CFGGuider=type('CFGGuider', (), {}), calc_cond_batch=None))
stand_in('modules', scripts=stand_in('modules.scripts', Script=type('Script', (), {})),
         script_callbacks=stand_in('modules.script_callbacks', on_cfg_denoiser=noop, on_cfg_denoised=noop))
stand_in('gradio')
path = list(sys.path)
comfyui = load('kdiff_align_comfyui', sys.argv[1])
a1111 = load('kdiff_align_cfg', sys.argv[2])
import kdiff_align  # noqa: E402

print(json.dumps({'kdiff_align': kdiff_align.__file__, 'path_unchanged': sys.path == path,
                  'nodes': sorted(comfyui.NODE_CLASS_MAPPINGS), 'a1111_script': hasattr(a1111, 'Script')}))
