//! The i8042 keyboard controller, as far as a microVM needs it: the reset
//! line (the guest's reboot), ctrl-alt-del for a graceful stop, and enough
//! of the controller and keyboard protocol (configuration byte, self-tests,
//! command acknowledgements, keyboard id) that Linux's i8042 and atkbd
//! drivers probe it and register a keyboard, so the scancodes reach them.
//! It holds no guest memory and never blocks; it must not grow into a PS/2
//! emulation (no mouse, no scancode sets, no LEDs).

use std::collections::VecDeque;
use vmm_sys_util::eventfd::EventFd;

/// The data port (scancodes, command arguments and answers).
pub const DATA_PORT: u16 = 0x60;
/// The command/status port.
pub const CMD_PORT: u16 = 0x64;
/// The keyboard's interrupt line.
pub const KBD_IRQ: u32 = 1;

/// Ctrl (make), Alt (make), Del (extended make): what a keyboard sends for
/// ctrl-alt-del; Linux answers it with a reboot (Firecracker does the same).
const CTRL_ALT_DEL: [u8; 4] = [0x1d, 0x38, 0xe0, 0x53];

// Controller commands (written to CMD_PORT).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

// Keyboard commands (written to DATA_PORT) and answers.
const KBD_GET_ID: u8 = 0xf2;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_OK: u8 = 0xaa;
const KBD_ID: [u8; 2] = [0xab, 0x83];

// Configuration byte bits.
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYS_FLAG: u8 = 0x04;
const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_AUX_DISABLED: u8 = 0x20;
// Status register bits.
const STATUS_OUT_FULL: u8 = 0x01;
const STATUS_SYS_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_CMD: u8 = 0x08;
/// Set while the keyboard is not locked (Linux warns when it is clear).
const STATUS_UNLOCKED: u8 = 0x10;

/// What a guest write asks of the VMM.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    None,
    /// The guest pulsed the reset line.
    Reset,
}

pub struct I8042 {
    out: VecDeque<u8>,
    ctr: u8,
    outp: u8,
    /// A controller command waiting for its argument on the data port.
    pending: Option<u8>,
    last_was_cmd: bool,
    irq: EventFd,
}

impl I8042 {
    pub fn new(irq: EventFd) -> Self {
        I8042 {
            out: VecDeque::new(),
            ctr: CTR_KBD_INT | CTR_SYS_FLAG | CTR_AUX_DISABLED,
            outp: 0x01,
            pending: None,
            last_was_cmd: false,
            irq,
        }
    }

    pub fn status(&self) -> u8 {
        let mut s = STATUS_SYS_FLAG | STATUS_UNLOCKED;
        if !self.out.is_empty() {
            s |= STATUS_OUT_FULL;
        }
        if self.last_was_cmd {
            s |= STATUS_LAST_WAS_CMD;
        }
        s
    }

    pub fn read_data(&mut self) -> u8 {
        self.out.pop_front().unwrap_or(0)
    }

    pub fn write_cmd(&mut self, cmd: u8) -> Action {
        self.last_was_cmd = true;
        self.pending = None;
        match cmd {
            CMD_READ_CTR => self.out.push_back(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_OUTP => self.pending = Some(cmd),
            CMD_SELF_TEST => self.out.push_back(0x55),
            CMD_KBD_TEST => self.out.push_back(0x00),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLED,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBD_DISABLED,
            // There is no mouse, but the bit reads back as the driver set it.
            CMD_AUX_DISABLE => self.ctr |= CTR_AUX_DISABLED,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUX_DISABLED,
            CMD_READ_OUTP => self.out.push_back(self.outp),
            CMD_RESET_CPU => return Action::Reset,
            _ => {}
        }
        Action::None
    }

    pub fn write_data(&mut self, v: u8) -> Action {
        self.last_was_cmd = false;
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.ctr = v,
            // Bit 0 of the output port is the reset line, active low.
            Some(CMD_WRITE_OUTP) if v & 1 == 0 => return Action::Reset,
            Some(CMD_WRITE_OUTP) => self.outp = v,
            _ => {
                // A keyboard command: acknowledge it, and answer the two
                // that atkbd's probe needs answered.
                self.out.push_back(KBD_ACK);
                match v {
                    KBD_GET_ID => self.out.extend(KBD_ID),
                    KBD_RESET => self.out.push_back(KBD_SELF_TEST_OK),
                    _ => {}
                }
                self.interrupt();
            }
        }
        Action::None
    }

    /// Queues ctrl-alt-del, as the host's graceful stop.
    pub fn ctrl_alt_del(&mut self) {
        self.out.extend(CTRL_ALT_DEL);
        self.interrupt();
    }

    fn interrupt(&self) {
        if self.ctr & CTR_KBD_INT != 0 {
            let _ = self.irq.write(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kbd() -> I8042 {
        I8042::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())
    }

    #[test]
    fn configuration_byte_reads_back_what_was_written() {
        let mut k = kbd();
        k.write_cmd(CMD_READ_CTR);
        assert_eq!(k.status() & STATUS_OUT_FULL, 1);
        assert_eq!(k.read_data(), CTR_KBD_INT | CTR_SYS_FLAG | CTR_AUX_DISABLED);
        k.write_cmd(CMD_AUX_ENABLE);
        k.write_cmd(CMD_READ_CTR);
        assert_eq!(k.read_data() & CTR_AUX_DISABLED, 0);
        assert_eq!(k.status() & STATUS_OUT_FULL, 0);
        k.write_cmd(CMD_WRITE_CTR);
        assert_eq!(k.write_data(0x65), Action::None);
        k.write_cmd(CMD_READ_CTR);
        assert_eq!(k.read_data(), 0x65);
        k.write_cmd(CMD_SELF_TEST);
        assert_eq!(k.read_data(), 0x55);
    }

    #[test]
    fn keyboard_commands_are_acknowledged_and_interrupt_when_enabled() {
        let mut k = kbd();
        k.write_data(KBD_GET_ID);
        assert_eq!(
            [k.read_data(), k.read_data(), k.read_data()],
            [KBD_ACK, 0xab, 0x83]
        );
        assert_eq!(k.irq.read().unwrap(), 1);
        // Keyboard interrupts off: the answer is polled, no interrupt.
        k.write_cmd(CMD_WRITE_CTR);
        k.write_data(CTR_SYS_FLAG);
        k.write_data(0xed);
        assert_eq!(k.read_data(), KBD_ACK);
        assert!(k.irq.read().is_err(), "no interrupt expected");
    }

    #[test]
    fn reset_through_the_command_or_the_output_port() {
        let mut k = kbd();
        assert_eq!(k.write_cmd(CMD_RESET_CPU), Action::Reset);
        k.write_cmd(CMD_WRITE_OUTP);
        assert_eq!(k.write_data(0x03), Action::None);
        k.write_cmd(CMD_WRITE_OUTP);
        assert_eq!(k.write_data(0x02), Action::Reset);
    }

    #[test]
    fn ctrl_alt_del_queues_the_three_keys() {
        let mut k = kbd();
        k.ctrl_alt_del();
        let keys: Vec<u8> = (0..4).map(|_| k.read_data()).collect();
        assert_eq!(keys, CTRL_ALT_DEL);
        assert_eq!(k.read_data(), 0);
    }
}
