from setuptools import setup

setup(
    name="modeling-selfie",
    version="0.1.0",
    description="SELFIE (SELF1E): an InternVL3 MLLM that segments with a single [SEG] token, for transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=["modeling_selfie", "modeling_selfie.configuration", "modeling_selfie.data"],
    py_modules=["selfie_segment"],  # the CLI's argument parser, importable without torch (see its docstring)
    package_dir={"modeling_selfie.configuration": "configuration"},
    package_data={
        "modeling_selfie.configuration": ["*.json", "recipes/*", "launch/*"],
        "modeling_selfie": ["pretrained/selfie-refshapes/*"],
    },
    install_requires=[
        "torch>=2.11,<2.15",
        "transformers>=5.17,<5.25",  # differences between releases: modeling_selfie/compat.py
        "peft>=0.21,<0.22",
        "accelerate>=1.15,<2",
        "safetensors>=0.4.3,<1",
        "huggingface_hub>=1.5,<3",
        "tokenizers>=0.23,<0.24",
        "pillow>=12.1.1,<13",  # the SELF1E authors' tiles (13 resizes some images differently): docs/evaluation.md
        "pycocotools>=2.0.11,<2.1",
        "numpy>=2,<3",
        "tqdm>=4.66",
        # SFTTrainer / GRPOTrainer (modeling_selfie/trl_selfie.py); 1.16 accepts transformers 5.17 to 5.24 (README)
        "trl>=1.16,<1.17",
    ],
    extras_require={
        "dev": ["pytest>=9,<10", "parameterized>=0.9,<1"],
        "app": ["gradio>=6,<7"],
        # quantized loading (docs/performance.md); transformers imports torchao, when installed, with every model
        "quant": ["bitsandbytes>=0.50.2,<0.51", "torchao>=0.18,<0.19"],
        # `lmms-eval --model selfie` (docs/evaluation.md): what lmms-eval 0.7.3 imports to run image tasks, without
        # its own requirements (torchvision's PyPI wheel, built for CUDA torch, breaks `import torchvision` and so
        # transformers' AutoProcessor next to a CPU torch, and pip would replace the user's torch); lmms-eval itself
        # is installed with `pip install --no-deps lmms-eval==0.7.3`. filelock 4 lacks the `filelock._api` lmms-eval
        # imports (every evaluation fails while the process exits 0).
        "lmms": [
            "datasets>=2.19,<6",
            "evaluate>=0.4,<0.5",
            "filelock>=3.16,<4",
            "loguru>=0.7,<1",
            "pytablewriter>=1,<2",
            "pytz",
            "sacrebleu>=2,<3",
            "tenacity>=8.3,<10",
        ],
    },
    entry_points={
        "console_scripts": [
            "selfie-segment=selfie_segment:main",
            "selfie-convert=modeling_selfie.convert:main",
            "selfie-evaluate=modeling_selfie.evaluate:main",
            "selfie-train=modeling_selfie.training:main",
        ],
        # `lmms-eval --model selfie` (modeling_selfie/lmms_eval_model.py); read by lmms-eval only
        "lmms_eval.models": ["selfie=modeling_selfie.lmms_eval_model:MANIFEST"],
    },
)
