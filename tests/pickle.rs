//! The safe pickle reader on the torch files of the fixtures: every tensor equals the same tensor read from the
//! matching safetensors file; the `os.system` payloads are refused naming the file, the key and the callable, and
//! never run.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device};
use sketchx_core::models::pickle::{Entry, StorageDtype, TorchFile};
use sketchx_core::models::weights::SafetensorsFile;
use sketchx_core::Error;

fn formats() -> PathBuf {
    common::fixtures().join("formats")
}

/// Both tensors, as f32 values, are bit for bit equal.
fn assert_same(a: &candle_core::Tensor, b: &candle_core::Tensor, name: &str) {
    assert_eq!(a.dims(), b.dims(), "{name}");
    let a: Vec<u32> = a
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect();
    let b: Vec<u32> = b
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect();
    assert!(a == b, "{name} differs");
}

#[test]
fn controlnet_pth_equals_its_safetensors_twin() {
    let pth = TorchFile::open(&formats().join("single_file/tiny-controlnet.pth")).unwrap();
    let sd = pth.state_dict().unwrap();
    let st =
        SafetensorsFile::open(&formats().join("single_file/tiny-controlnet.safetensors")).unwrap();
    assert_eq!(sd.names().len(), st.names().len());
    for name in sd.names() {
        // The .pth has plain keys, the safetensors file the control_model. prefix.
        let twin = format!("control_model.{name}");
        assert_eq!(sd.shape(name).unwrap(), st.shape(&twin).unwrap(), "{name}");
        assert_eq!(sd.info(name).unwrap().dtype, StorageDtype::F32);
        let a = sd.load(name, DType::F32, &Device::Cpu).unwrap();
        let b = st.load(&twin, DType::F32, &Device::Cpu).unwrap();
        assert_same(&a, &b, name);
    }
}

#[test]
fn training_checkpoint_unwraps_state_dict_and_keeps_fp16_exact() {
    let ckpt = TorchFile::open(&formats().join("single_file/tiny-sd-ema.ckpt")).unwrap();
    let mut top = ckpt.keys_at(&[]).unwrap();
    top.sort();
    assert_eq!(
        top,
        [
            "callbacks",
            "epoch",
            "global_step",
            "lr_schedulers",
            "optimizer_states",
            "pytorch-lightning_version",
            "state_dict"
        ]
    );
    assert!(matches!(ckpt.get(&["global_step"]).unwrap(), Entry::Int(_)));
    let sd = ckpt.state_dict().unwrap();
    // 1219 entries, every one a tensor (the scalars model_ema.decay / num_updates are 0-dim tensors).
    assert_eq!(sd.names().len(), 1219);
    let fp16 =
        SafetensorsFile::open(&formats().join("single_file/tiny-sd.fp16.safetensors")).unwrap();
    let mut compared = 0;
    for name in fp16.names() {
        let a = sd.load(&name, DType::F32, &Device::Cpu).unwrap();
        let b = fp16.load(&name, DType::F32, &Device::Cpu).unwrap();
        assert_same(&a, &b, &name);
        compared += 1;
    }
    assert_eq!(compared, 494 + 180 + 36);
    assert_eq!(
        sd.info("model.diffusion_model.input_blocks.0.0.weight")
            .unwrap()
            .dtype,
        StorageDtype::F16
    );
    assert_eq!(
        sd.info("cond_stage_model.transformer.text_model.embeddings.position_ids")
            .unwrap()
            .dtype,
        StorageDtype::I64
    );
}

#[test]
fn textual_inversion_pt_reads_nested_dicts_and_plain_values() {
    let pt = TorchFile::open(&formats().join("textual_inversion/tiny-style.pt")).unwrap();
    assert_eq!(pt.get(&["name"]).unwrap(), Entry::Str("tiny-style".into()));
    assert_eq!(pt.get(&["string_to_token", "*"]).unwrap(), Entry::Int(265));
    let params = pt.tensors_at(&["string_to_param"]).unwrap();
    assert_eq!(params.names(), ["*"]);
    let t = params.tensor("*").unwrap();
    assert_eq!(t.dims(), &[2, 32]);
    assert_eq!(t.dtype(), DType::F32);
}

#[test]
fn os_system_payloads_are_refused_by_name_and_never_run() {
    for file in ["pickle_os_system.ckpt", "pickle_os_system_raw.ckpt"] {
        let path = formats().join("bad").join(file);
        let opened = TorchFile::open(&path).unwrap();
        match opened.state_dict() {
            Err(Error::Checkpoint {
                path: p,
                key,
                message,
            }) => {
                assert!(p.ends_with(file), "{p}");
                assert_eq!(
                    key,
                    "state_dict/model.diffusion_model.input_blocks.0.0.weight"
                );
                assert!(message.contains("os.system"), "{message}");
            }
            other => panic!("{file}: {other:?}"),
        }
    }
}
