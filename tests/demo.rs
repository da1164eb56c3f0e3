//! The demo's claim, checked: LoRA on a small random LLaMA learns the demo task, on question
//! pairs it never saw in training (a smaller run than `candle-peft demo`).

use candle_peft::demo::{run, DemoSize};

#[test]
fn lora_learns_the_demo_task() {
    let out = tempfile::tempdir().unwrap();
    let size = DemoSize { epochs: 3.0, test_size: 60, ..DemoSize::default() };
    let result = run(out.path(), 1, &size).unwrap();
    assert!(result.accuracy_before <= 0.65, "before: {}", result.accuracy_before);
    assert!(result.accuracy_after >= 0.85, "after: {}", result.accuracy_after);
    assert!(out.path().join("run-1/adapter/adapter_model.safetensors").is_file());
}
